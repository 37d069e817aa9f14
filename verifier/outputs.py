"""What a request asks to get back beside the tokens: stop sequences, log-probabilities, echo.

The receipt's manifest binds it (`output`), the engine follows it, the verifier checks it; one
definition here serves all three (docs/PROTOCOL.md, "Stop sequences, logprobs and echo").

Stop rule. Let text_i be the detokenization of the first i output tokens. Generation ends after
token i at the first i where the token is an EOS or stop token id, or some stop string occurs in
text_i, or i = max_tokens. The text returned (and committed as the receipt's `text`) is text_n
cut before the earliest occurrence of any stop string in it (the stop string is not returned, as
OpenAI does), else text_n whole; finish_reason is "stop" for an EOS, a stop token id or a stop
string, else "length".
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_STOP = 4  # OpenAI's bound on stop strings
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_IDS = 64
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class OutputPolicy:
    """stop strings, stop token ids, logprobs (None: off; k: the chosen token's logprob and the
    k most likely), echo (completions: the prompt is returned before the completion, and with
    logprobs the prompt tokens' logprobs too)."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        problem = policy_error(self.manifest())
        if problem:
            raise ValueError(problem)

    @property
    def prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def manifest(self) -> dict:
        return {"stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids),
                "logprobs": self.logprobs, "echo": self.echo}

    @classmethod
    def from_manifest(cls, m: dict) -> OutputPolicy:
        problem = policy_error(m)
        if problem:
            raise ValueError(problem)
        return cls(tuple(m["stop"]), tuple(m["stop_token_ids"]), m["logprobs"], m["echo"])


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def policy_error(m) -> str | None:
    """Why a manifest `output` section is outside the protocol's domain, or None."""
    if not isinstance(m, dict) or set(m) != {"stop", "stop_token_ids", "logprobs", "echo"}:
        return "output must be {stop, stop_token_ids, logprobs, echo}"
    stop, ids, lp, echo = m["stop"], m["stop_token_ids"], m["logprobs"], m["echo"]
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
            or len(set(stop)) != len(stop)):
        return (f"stop: at most {MAX_STOP} distinct non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters")
    if (not isinstance(ids, list) or len(ids) > MAX_STOP_IDS
            or not all(_int(t) and 0 <= t < 2**32 for t in ids) or len(set(ids)) != len(ids)):
        return f"stop_token_ids: at most {MAX_STOP_IDS} distinct token ids"
    if lp is not None and not (_int(lp) and 0 <= lp <= MAX_TOP_LOGPROBS):
        return f"logprobs: null or an integer in [0, {MAX_TOP_LOGPROBS}]"
    if not isinstance(echo, bool):
        return "echo must be a bool"
    return None


class StopScan:
    """The stop rule, one token at a time: push(token) -> True when generation ends there.
    `text` is then the text to return. The engine and the verifier run this same code."""

    def __init__(self, tokenizer, policy: OutputPolicy, eos_ids, max_tokens: int):
        self.tok, self.stop = tokenizer, policy.stop
        self.enders = set(eos_ids) | set(policy.stop_token_ids)
        self.max_tokens, self.ids, self.text, self.cut = max_tokens, [], "", None

    def push(self, token: int) -> bool:
        self.ids.append(token)
        if self.stop:
            full = self.tok.decode(self.ids)
            hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.cut = min(hits)
                self.text = full[:self.cut]
                return True
        return token in self.enders or len(self.ids) >= self.max_tokens

    def final_text(self) -> str:
        """The text to return for the tokens pushed so far."""
        return self.text if self.cut is not None else self.tok.decode(self.ids)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.cut is not None or (self.ids and self.ids[-1] in self.enders) \
            else "length"


def returned_text(receipt: dict, tokenizer=None) -> str:
    """What the client is shown: the receipt's text, after the prompt when it asked for echo
    (a token-id prompt is shown detokenized, which needs the tokenizer)."""
    if not receipt["manifest"]["output"]["echo"]:
        return receipt["text"]
    prompt = receipt["request"]["prompt"]
    if not isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("echo of a token-id prompt needs the tokenizer")
        prompt = tokenizer.decode(prompt)
    return prompt + receipt["text"]
