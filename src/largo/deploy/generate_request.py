"""The bodies of POST /generate and POST /feedback on a language-model (or seq2seq) server, and the
checks of a /generate request against the model being served (`checked_request`): each problem is
an `InputError`, answered 422 naming the field. Torch-free, like the service.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from largo.deploy.schema import InputError


class ChatMessage(BaseModel):
    """One turn of a conversation; other keys (a tool call's, a name) go to the template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(
        ..., min_length=1, description="system, user or assistant (as the model's template knows)."
    )
    content: str = Field(..., description="The text of the turn.")


class GenerateRequest(BaseModel):
    """The body of POST /generate. Strict: "5" is not a number, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(
        None,
        description="The text to continue (may be empty; a too long one keeps its end), or a seq2seq "
        "model's source (a too long one keeps its start). Give this or messages.",
    )
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        description="A conversation instead of a prompt (a model with a chat template: an imported "
        "instruct model); the answer is the assistant's next turn.",
    )
    max_new_tokens: int = Field(100, ge=0, description="Most tokens to generate (≤ the server's limit).")
    temperature: float | None = Field(
        None,
        ge=0,
        description="0 is greedy; higher is more varied; null: the model's default (0.8 for a language "
        "model, 0 for a seq2seq model, whose outputs have one right answer).",
    )
    top_k: int | None = Field(50, ge=1, description="Sample among the k likeliest tokens (null: all).")
    top_p: float | None = Field(
        None, gt=0, le=1, description="Sample among the likeliest tokens of this mass."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling seed; null: a new one, answered.")
    stop_at_eot: bool = Field(True, description="Stop at the end-of-text token.")
    stream: bool | None = Field(None, description="Server-sent events; default: when Accept asks for them.")
    beams: int | None = Field(
        None,
        ge=1,
        le=16,
        description="A seq2seq model only: beam search with this many beams (better outputs; the text "
        "comes whole, as one piece, when the search ends); null or 1: tokens as they are generated.",
    )


class GenerationFeedback(BaseModel):
    """The body of POST /feedback on an LM server: a rating of a generation, a better completion, or both."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: uuid.UUID = Field(..., description="The `id` of a generation from POST /generate.")
    rating: Literal["good", "bad"] | None = Field(None, description="Was the generated text good?")
    completion: str | None = Field(
        None, min_length=1, description="The text the model should have written after the prompt."
    )

    @model_validator(mode="after")
    def _something(self) -> GenerationFeedback:
        if self.rating is None and self.completion is None:
            raise ValueError("give a rating ('good' or 'bad'), a completion, or both")
        return self


def _invalid(field: str, msg: str, kind: str = "value_error") -> InputError:
    return InputError([{"loc": ["body", field], "msg": msg, "type": kind}])


def checked_request(body: GenerateRequest, generator: Any, task: str, limit: int) -> GenerateRequest:
    """The request as the model runs it (a conversation laid out as its prompt by the model's chat
    template); InputError for what this server or model cannot do: more than `limit` new tokens,
    stop_at_eot off or sampled beams on a seq2seq model, beams on a language model, a prompt and
    messages both or neither, messages to a model without a chat template or that its template refuses."""
    if body.max_new_tokens > limit:
        msg = f"Input should be less than or equal to {limit} (this server's max_new_tokens_limit)"
        raise _invalid("max_new_tokens", msg, "less_than_equal")
    if not body.stop_at_eot and task == "seq2seq":
        raise _invalid(
            "stop_at_eot",
            "a seq2seq model's output ends at its end-of-sequence token; leave stop_at_eot true",
        )
    if (body.beams or 1) > 1 and (task != "seq2seq" or body.temperature not in (None, 0)):
        msg = (
            "beam search is for a seq2seq model (this one is a language model: sample instead)"
            if task != "seq2seq"
            else "beam search is deterministic: leave temperature out (or use beams 1 to sample)"
        )
        raise _invalid("beams", msg)
    if (body.prompt is None) == (body.messages is None):
        raise _invalid("prompt", "give a prompt or messages (one of them)")
    if body.messages is None:
        return body
    try:  # the conversation becomes the prompt the model continues
        prompt = generator.chat_prompt([m.model_dump() for m in body.messages])
    except ValueError as e:
        hint = "; send a prompt" if getattr(generator, "chat_template", None) is None else ""
        raise _invalid("messages", f"{e}{hint}") from None
    return body.model_copy(update={"prompt": prompt})
