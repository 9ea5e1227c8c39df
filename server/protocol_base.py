"""What every request body model shares: unknown fields refused, `null` as the default, lists that
stop validating at their first bad item, and the table-driven refusal of the fields the server
knows but does not implement (`Unimplemented`, `refusals`, and `refuse` for a one-off)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def FastList(item, **constraints):  # noqa: N802 (a type)
    """A list whose validation stops at its first bad item: one error, not one per item (a
    hostile body of 400,000 bad items would otherwise make 400,000 error objects)."""
    return Annotated[list[item], Field(fail_fast=True, **constraints)]


class StrictModel(BaseModel):
    """Unknown fields are refused; a `null` field (known or not) asks for nothing and is
    dropped, so that it takes its default, except the fields where null has a meaning."""

    model_config = ConfigDict(extra="forbid")
    _null_means_something: frozenset[str] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            keep = cls._null_means_something.default
            return {key: value for key, value in data.items() if value is not None or key in keep}
        return data


@dataclass(frozen=True)
class Unimplemented:
    """A known field the server does not implement: accepted at null and at the values in
    `accepted` (those that ask for nothing), and when `empty`, at an empty list or object (or one
    of nulls); any other value is a 400 saying `why`."""

    why: str
    accepted: tuple = ()
    empty: bool = False

    def check(self, value: Any) -> Any:
        asks_nothing = value is None or value in self.accepted or (self.empty and _empty(value))
        if not asks_nothing:
            raise ValueError(self.why)
        return value


def _empty(value: Any) -> bool:
    if isinstance(value, dict):
        return all(item is None for item in value.values())
    return isinstance(value, list) and not value


def refusals(table: dict[str, Unimplemented]):
    """One field validator for every field of `table` (each protocol module's table of the fields
    it knows but does not implement)."""
    def check(cls, value, info):
        return table[info.field_name].check(value)
    return field_validator(*table)(classmethod(check))


def refuse(value: Any, allowed: Any, why: str) -> Any:
    """A field the server does not implement, accepted only at its do-nothing value."""
    if value is not None and value != allowed:
        raise ValueError(why)
    return value


def at_most(value: Any, limit: int, why: str) -> Any:
    """A list or object of at most `limit` entries; else ValueError(`why`, where {count} is its size)."""
    if value is not None and len(value) > limit:
        raise ValueError(why.format(count=len(value)))
    return value
