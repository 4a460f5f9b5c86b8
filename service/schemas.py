"""Request and response bodies of the HTTP API (with the examples OpenAPI shows at /docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NonEmpty = Annotated[str, Field(min_length=1)]


def _nonblank(v: str | list[str] | None, field: str) -> str | list[str] | None:
    if v is None:
        return v
    items = [v] if isinstance(v, str) else v
    if isinstance(v, list) and not v:
        raise ValueError("must not be an empty list")
    for i, s in enumerate(items):
        which = "" if isinstance(v, str) else f"item {i} "
        if not s.strip():
            raise ValueError(f"{which}must not be empty")
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape decodes to a lone surrogate
                raise ValueError(
                    f"{which}is not valid Unicode: a lone surrogate U+{ord(s[e.start]):04X} at character {e.start}"
                ) from None
    return v


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {"text": "a gripping, beautifully made film"},
                {"model": "sst2-minilm-l6", "text": ["a gripping film", "a dull, lifeless mess"]},
                # pairs go to a pair model (its text_fields name two), such as one trained on MRPC
                {
                    "model": "mrpc",
                    "text": ["A man is playing a guitar."],
                    "text_pair": ["Someone plays music."],
                },
            ]
        },
    )
    model: str | None = Field(None, description="served model name; default: the first classification model")
    text: str | list[str] = Field(description="one text or a list of texts")
    text_pair: str | list[str] | None = Field(
        None,
        description="second texts, one per text, for a sentence-pair model (MRPC, RTE, STS-B: its "
        "text_fields name two); a single-text model refuses them (422)",
    )

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | list[str]) -> str | list[str]:
        return _nonblank(v, "text")  # type: ignore[return-value]

    @field_validator("text_pair")
    @classmethod
    def _pair(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _nonblank(v, "text_pair")

    @model_validator(mode="after")
    def _pairs_match(self) -> ClassifyRequest:
        if self.text_pair is not None and isinstance(self.text, str) != isinstance(self.text_pair, str):
            raise ValueError("text_pair must be a string when text is, and a list when text is a list")
        if isinstance(self.text_pair, list) and len(self.text_pair) != len(self.text):
            raise ValueError(f"text_pair has {len(self.text_pair)} items but text has {len(self.text)}")
        return self

    def texts(self) -> tuple[list[str], list[str] | None]:
        t = [self.text] if isinstance(self.text, str) else list(self.text)
        p = self.text_pair
        return t, ([p] if isinstance(p, str) else list(p)) if p is not None else None


class QARequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "question": "Where is the Eiffel Tower?",
                    "context": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
                }
            ]
        },
    )
    model: str | None = Field(None, description="served model name; default: the first QA model")
    question: str | list[str]
    context: str | list[str] = Field(description="long contexts are split into overlapping windows")

    @field_validator("question", "context")
    @classmethod
    def _nonempty(cls, v: str | list[str]) -> str | list[str]:
        return _nonblank(v, "")  # type: ignore[return-value]

    @model_validator(mode="after")
    def _match(self) -> QARequest:
        if isinstance(self.question, str) != isinstance(self.context, str):
            raise ValueError("question and context must both be strings or both be lists")
        if isinstance(self.question, list) and len(self.question) != len(self.context):
            raise ValueError(f"{len(self.question)} questions but {len(self.context)} contexts")
        return self

    def pairs(self) -> tuple[list[str], list[str]]:
        if isinstance(self.question, str):
            return [self.question], [self.context]  # type: ignore[list-item]
        return list(self.question), list(self.context)


class ClassifyResult(BaseModel):
    label: str | None = Field(None, description="the most probable label (classification)")
    probability: float | None = Field(None, description="its probability")
    scores: dict[str, float] | None = Field(None, description="every label's probability")
    value: float | None = Field(None, description="the prediction of a regression model")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    width: float
    depth: float
    results: list[ClassifyResult]


class QAResult(BaseModel):
    answer: str
    start: int = Field(description="character offset of the answer in its context")
    end: int = Field(description="character offset just past the answer")
    score: float


class QAResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    width: float
    depth: float
    results: list[QAResult]


class SubnetInfo(BaseModel):
    width: float
    depth: float
    params: int
    flops: int = Field(description="forward FLOPs of the encoder at 128 tokens")
    metric: float | None = Field(None, description="dev metric from eval.json")
    latency_ms: float = Field(description="calibrated latency of one 128-token input (batch 1)")
    latency_ms_batch8: float = Field(description="calibrated latency of a batch of 8 128-token inputs")
    pareto: bool = Field(
        description="on the accuracy-latency front: no other sub-network is at least as accurate and "
        "no slower at every shape. Budget routing (policy sla) chooses among these; a pin reaches any"
    )


class ModelInfo(BaseModel):
    name: str
    default: bool = Field(
        description="answers the requests of its route (/v1/classify or /v1/qa) that name no model: "
        "the first served model of its kind"
    )
    task: str
    task_name: str
    labels: list[str]
    text_fields: list[str]
    metric_name: str
    max_seq_length: int
    profile: str = Field(description="calibrated, cache (re-checked) or flops (not measured)")
    subnetworks: list[SubnetInfo]


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
