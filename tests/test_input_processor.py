"""The input processor: the one place where a request's ids, context, session rules and sink
policy are checked before the engine takes it."""

import pytest

from model.sampling_params import SamplingParams
from model.tokenizers.tokenizer_loader import load_tokenizer
from model.checkpoints.model_path import BUNDLED_MODEL_DIR
from scheduler.input_processor import InputLimits, InputProcessor, PromptTooLongError
from scheduler.sink_policy import SinkPolicy


@pytest.fixture(scope="module")
def processor() -> InputProcessor:
    limits = InputLimits(vocab_size=512, max_model_len=64, max_num_seqs=4, num_kv_blocks=8, block_size=4,
                         attention_sinks=4, attention_window=None)
    return InputProcessor(load_tokenizer(BUNDLED_MODEL_DIR), limits)


def test_a_request_is_checked_and_typed_once(processor):
    request = processor.process("r", "Once upon a time", SamplingParams(max_tokens=8), session_id="s",
                                cache_salt="salt", tenant="t", deadline=12.5)
    assert request.prompt_token_ids == processor.tokenizer.encode("Once upon a time")
    assert request.sink_policy is None  # the engine's default is dense
    assert (request.session_id, request.cache_salt, request.tenant, request.deadline) == ("s", "salt", "t", 12.5)


def test_the_sink_policy_comes_from_the_options_or_as_resolved(processor):
    assert processor.process("r", [1, 2, 3], SamplingParams(), attention_window=16).sink_policy == \
        SinkPolicy(4, 16, 4)
    resolved = processor.sink_policy(2, 8)
    assert processor.process("r", [1, 2, 3], SamplingParams(), sink_policy=resolved).sink_policy is resolved
    # A resolved dense policy is not resolved again from the defaults.
    assert processor.process("r", [1, 2, 3], SamplingParams(), attention_window=16,
                             sink_policy=None).sink_policy is None
    with pytest.raises(ValueError, match="must not exceed the context"):
        processor.sink_policy(8, 60)
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        processor.process("r", [1, 2, 3], SamplingParams(), attention_sinks=0, attention_window=40)


@pytest.mark.parametrize("prompt, params, message, param", [
    ([], SamplingParams(), "the prompt is empty", None),
    ([1, 512], SamplingParams(), r"prompt token ids must be in \[0, 512\)", None),
    ([1], SamplingParams(logit_bias={600: 1.0}), r"logit_bias token ids must be in \[0, 512\)", "logit_bias"),
    ([1], SamplingParams(stop_token_ids=[512]), r"stop_token_ids must be in \[0, 512\)", "stop_token_ids"),
    ([1], SamplingParams(n=5), "n=5 is more than max_num_seqs=4", None),
])
def test_bad_input_is_a_value_error_naming_it(processor, prompt, params, message, param):
    with pytest.raises(ValueError, match=message) as raised:
        processor.process("r", prompt, params)
    assert getattr(raised.value, "param", None) == param


def test_the_context_bounds_a_dense_request_but_not_a_windowed_one(processor):
    with pytest.raises(PromptTooLongError, match="maximum context length is 64 tokens.*requested 70 tokens"):
        processor.process("r", list(range(1, 61)), SamplingParams(max_tokens=10))
    long = processor.process("r", list(range(1, 200)), SamplingParams(max_tokens=1000), attention_window=16)
    assert len(long.prompt_token_ids) == 199


def test_session_rules(processor):
    with pytest.raises(ValueError, match="n = 1"):
        processor.process("r", [1, 2], SamplingParams(n=2), session_id="s")
    with pytest.raises(ValueError, match="prompt logprobs"):
        processor.process("r", [1, 2], SamplingParams(prompt_logprobs=1), session_id="s")
