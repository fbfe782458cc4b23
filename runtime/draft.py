"""Draft proposers: the EAGLE-3 style draft head and the model-free n-gram proposer.

Both sit behind one interface: ``proposer.start(prompt_ids)`` returns a per-request
session whose ``propose(tokens, features, k, temperature, generator)`` returns the
next ``k`` draft tokens (and their draft probabilities when sampled).

The draft head (EAGLE-3): target hidden states from a low, a middle and a high
layer are fused by one linear layer; one Llama-style decoder layer takes the
fused feature together with the embedding of the next token and predicts the
token after it, through a reduced draft vocabulary (``d2t`` maps draft ids to
target ids). Chain drafting feeds the layer's own output back as the next
feature. Training uses the same two functions (``step1`` over a sequence with
target features, ``chain`` for the unrolled steps), so what is trained is what
is served.

Indexing, used throughout: the target has features ``F[i]`` for every position
``i`` it processed; the draft pairs ``F[i]`` with token ``x[i+1]`` and predicts
``x[i+2]``. A chain from anchor ``p`` runs steps ``s = 1..k``: step 1 is the pair
``(F[p], x[p+1])``; step ``s > 1`` is ``(g[s-1], c[s])`` at position ``p+s-1``,
attending to step-1 keys at positions ``<= p`` and to its own earlier chain keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurora.runtime.cost import Adaptive, GainPrior, Throttle, VerifyCost
from aurora.runtime.llama import apply_rope, rms_norm, rope_cos_sin, rope_frequencies, rope_theta
from aurora.runtime.protocol import Builtin

if TYPE_CHECKING:
    from aurora.runtime.suffix import Draft

# ---------------------------------------------------------------------------- config


def tempered_probs(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / temperature) in float32, finite for every temperature > 0: the
    max is subtracted before dividing, so a tiny temperature tends to greedy instead of
    overflowing to inf and NaN probabilities (which made sampling fail)."""
    scaled = logits.float()
    scaled = scaled - scaled.max(dim=-1, keepdim=True).values
    # A temperature below float32's range would become 0 in the division (0/0 = NaN).
    return torch.softmax(scaled / max(temperature, torch.finfo(torch.float32).tiny), dim=-1)


@dataclass(frozen=True)
class DraftConfig:
    """The draft head's architecture; stored in every checkpoint's metadata."""

    target: str
    hidden_size: int
    target_vocab_size: int
    fuse_layers: tuple[int, int, int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    draft_vocab_size: int = 2048
    kind: str = "eagle3"

    @classmethod
    def for_target(
        cls,
        target_config: Any,
        target: str,
        *,
        fuse_layers: tuple[int, int, int] | None = None,
        draft_vocab_size: int = 2048,
    ) -> DraftConfig:
        """A draft shaped for a Hugging Face target config (Llama-like attention)."""
        n = int(target_config.num_hidden_layers)
        layers = fuse_layers or (2, n // 2, n - 3)
        if not all(0 <= i < n for i in layers):
            raise ValueError(
                f"fuse_layers {layers} out of range: the target has {n} layers (0..{n - 1})"
            )
        hidden = int(target_config.hidden_size)
        heads = int(target_config.num_attention_heads)
        return cls(
            target=target,
            hidden_size=hidden,
            target_vocab_size=int(target_config.vocab_size),
            fuse_layers=(int(layers[0]), int(layers[1]), int(layers[2])),
            num_heads=heads,
            num_kv_heads=int(getattr(target_config, "num_key_value_heads", heads) or heads),
            head_dim=int(getattr(target_config, "head_dim", None) or hidden // heads),
            intermediate_size=int(target_config.intermediate_size),
            rms_eps=float(getattr(target_config, "rms_norm_eps", 1e-5)),
            rope_theta=rope_theta(target_config),
            draft_vocab_size=min(draft_vocab_size, int(target_config.vocab_size)),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fuse_layers"] = list(self.fuse_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DraftConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"draft_config has unknown fields {sorted(unknown)}")
        values = dict(data)
        values["fuse_layers"] = tuple(values["fuse_layers"])
        return cls(**values)


# ---------------------------------------------------------------------------- head


class RMSNorm(nn.Module):
    """The target's RMSNorm (`aurora.runtime.llama.rms_norm`) with its own weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """The target's rotary position embedding (`aurora.runtime.llama`) for
    x [N, heads, head_dim] at integer positions [N]."""
    inv_freq = rope_frequencies(theta, x.shape[-1], x.device)
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype)
    return apply_rope(x, cos[:, None, :], sin[:, None, :])


class EagleDraftHead(nn.Module):
    """EAGLE-3 draft head. The target's token embedding is used frozen and is not
    part of the head's weights (nor of its checkpoints)."""

    d2t: Tensor
    target_embedding: nn.Embedding

    def __init__(self, config: DraftConfig, target_embedding: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        h, nh, nkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        # Not registered as a submodule: frozen, owned by the target, never saved.
        self.__dict__["target_embedding"] = target_embedding
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.embed_norm = RMSNorm(h, config.rms_eps)
        self.feature_norm = RMSNorm(h, config.rms_eps)
        self.q_proj = nn.Linear(2 * h, nh * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        self.post_norm = RMSNorm(h, config.rms_eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.final_norm = RMSNorm(h, config.rms_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        # d2t[j] is the target token id of draft token j (sorted ascending).
        self.register_buffer("d2t", torch.arange(config.draft_vocab_size), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        # Start as a residual pass-through of the fused feature plus attention.
        nn.init.zeros_(self.o_proj.weight)
        nn.init.zeros_(self.down_proj.weight)

    def set_vocabulary(self, token_ids: Tensor) -> None:
        """Choose the draft vocabulary (target ids); resets the LM head rows' meaning."""
        ids = torch.unique(token_ids.to(torch.long))
        if ids.numel() != self.config.draft_vocab_size:
            raise ValueError(
                f"draft vocabulary has {ids.numel()} ids, the config says "
                f"draft_vocab_size={self.config.draft_vocab_size}"
            )
        self.d2t.copy_(ids.to(self.d2t.device))

    def target_to_draft(self) -> Tensor:
        """t2d [target_vocab]: draft index of each target id, -1 where absent."""
        t2d = torch.full(
            (self.config.target_vocab_size,), -1, dtype=torch.long, device=self.d2t.device
        )
        t2d[self.d2t] = torch.arange(self.d2t.numel(), device=self.d2t.device)
        return t2d

    # -- the two computations shared by serving and training -------------------

    @property
    def hidden_indices(self) -> tuple[int, int, int]:
        """Where ``fuse`` reads in a target's ``output_hidden_states``: index 0 is the
        embedding output, layer i's output is at i + 1."""
        low, mid, high = self.config.fuse_layers
        return low + 1, mid + 1, high + 1

    def fuse(self, hidden_states: Sequence[Tensor] | Mapping[int, Tensor]) -> Tensor:
        """Pick the fused layers from a target's per-layer hidden states (all of them,
        or a mapping holding at least ``hidden_indices``), [..., 3H]."""
        low, mid, high = (hidden_states[i] for i in self.hidden_indices)
        return torch.cat([low, mid, high], dim=-1)

    def _qkv(self, feature: Tensor, tokens: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        c = self.config
        emb = self.target_embedding(tokens).to(feature.dtype)
        x = torch.cat([self.embed_norm(emb), self.feature_norm(feature)], dim=-1)
        q = self.q_proj(x).view(-1, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(-1, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(-1, c.num_kv_heads, c.head_dim)
        return rotate(q, positions, c.rope_theta), rotate(k, positions, c.rope_theta), v

    def _finish(self, residual: Tensor, attn: Tensor) -> Tensor:
        h = residual + self.o_proj(attn)
        m = self.post_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))

    def step1(
        self,
        features: Tensor,
        tokens: Tensor,
        positions: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Step 1 over T consecutive positions: raw target features [T, 3H], next
        tokens [T], positions [T]; attends causally to ``past`` keys/values
        [P, nkv, hd] then to itself. Returns (hidden [T, H], keys, values) where
        keys/values include the past."""
        fused = self.fc(features)
        q, k, v = self._qkv(fused, tokens, positions)
        if past is not None:
            k = torch.cat([past[0], k], dim=0)
            v = torch.cat([past[1], v], dim=0)
        t, m = q.shape[0], k.shape[0]
        mask = torch.ones(t, m, dtype=torch.bool, device=q.device).tril(diagonal=m - t)
        return self._finish(fused, self._attend_causal(q, k, v, mask)), k, v

    def _attend_causal(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        c = self.config
        group = c.num_heads // c.num_kv_heads
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, nh, T, hd]
        kh = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        vh = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[None, None])
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    def chain(
        self,
        prev_hidden: Tensor,
        tokens: Tensor,
        positions: Tensor,
        step1_keys: Tensor,
        step1_values: Tensor,
        anchors: Tensor,
        chain_keys: Tensor | None,
        chain_values: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One unrolled step for A chains at once: previous hidden [A, H], input
        tokens [A], positions [A]; each chain attends to step-1 keys at positions
        <= its anchor [A] and to its own earlier chain keys [A, r, nkv, hd].
        Returns (hidden [A, H], chain_keys, chain_values) with this step appended."""
        c = self.config
        q, k, v = self._qkv(prev_hidden, tokens, positions)
        k, v = k.unsqueeze(1), v.unsqueeze(1)
        chain_keys = k if chain_keys is None else torch.cat([chain_keys, k], dim=1)
        chain_values = v if chain_values is None else torch.cat([chain_values, v], dim=1)
        # Grouped-query attention without materialising per-chain copies of the step-1 keys.
        g = c.num_heads // c.num_kv_heads
        qg = q.view(q.shape[0], c.num_kv_heads, g, c.head_dim) / math.sqrt(c.head_dim)
        shared = torch.einsum("akgd,tkd->akgt", qg, step1_keys)
        visible = torch.arange(step1_keys.shape[0], device=q.device)[None, :] <= anchors[:, None]
        shared = shared.masked_fill(~visible[:, None, None, :], float("-inf"))
        own = torch.einsum("akgd,arkd->akgr", qg, chain_keys)
        probs = torch.softmax(torch.cat([shared, own], dim=-1).float(), dim=-1).to(q.dtype)
        t = step1_keys.shape[0]
        attn = torch.einsum("akgt,tkd->akgd", probs[..., :t], step1_values) + torch.einsum(
            "akgr,arkd->akgd", probs[..., t:], chain_values
        )
        return self._finish(prev_hidden, attn.reshape(q.shape[0], -1)), chain_keys, chain_values

    def logits(self, hidden: Tensor) -> Tensor:
        """Draft-vocabulary logits [..., V_draft]."""
        return self.lm_head(self.final_norm(hidden))


# ---------------------------------------------------------------------------- proposers


@dataclass
class Proposal:
    """k draft tokens; ``probs`` [k, target_vocab] when they were sampled, None when
    the proposer is deterministic (each token then counts as probability one).
    ``confidence[i]``, when the proposer estimates it, is the probability that the
    first i + 1 tokens are all accepted."""

    tokens: list[int]
    probs: Tensor | None = None
    confidence: list[float] | None = None


class DraftSession(Protocol):
    def propose(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
        rows: int = 1,
    ) -> Proposal:
        """At most ``k`` draft tokens after ``tokens`` (the whole committed sequence);
        ``features`` are the target's fused-layer features for the positions it
        verified since the last call; ``rows`` is the batch the verify runs in."""
        ...


class Proposer(Protocol):
    """Anything that drafts tokens. ``needs_features`` asks the engine for the
    target's per-layer hidden states."""

    revision: str
    needs_features: bool

    def start(self, prompt_ids: list[int]) -> DraftSession: ...


class NgramProposer:
    """Prompt lookup: continue the most recent earlier occurrence of the context's
    last n tokens (longest n first). Model-free; a day-0 draft and a baseline."""

    needs_features = False

    def __init__(
        self, max_ngram: int = 3, min_ngram: int = 1, revision: str = Builtin.NGRAM
    ) -> None:
        self.max_ngram, self.min_ngram, self.revision = max_ngram, min_ngram, revision

    def start(self, prompt_ids: list[int]) -> NgramSession:
        return NgramSession(self.max_ngram, self.min_ngram)


@dataclass
class NgramSession:
    max_ngram: int
    min_ngram: int
    # n-gram -> start of the continuation after its latest occurrence
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0

    def propose(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
        rows: int = 1,
    ) -> Proposal:
        # Index every n-gram whose continuation start is an existing token.
        for start in range(max(self.indexed, 1), len(tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if start - n >= 0:
                    self.index[tuple(tokens[start - n : start])] = start
        self.indexed = max(self.indexed, len(tokens))
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) < n:
                continue
            found = self.index.get(tuple(tokens[-n:]))
            if found is not None:
                return Proposal(tokens[found : found + k])
        return Proposal([])


class EagleProposer:
    """Serves an EagleDraftHead: catch up on new target features, then chain. With
    ``adaptive`` the chain is greedy and its length chosen per step (see EagleSession);
    without it, k tokens every step (sampled above temperature 0)."""

    needs_features = True

    def __init__(
        self, head: EagleDraftHead, revision: str, adaptive: Adaptive | None = None
    ) -> None:
        self.head, self.revision, self.adaptive = head, revision, adaptive
        self.prior = GainPrior()  # what its drafts measured over every request so far

    @property
    def cost(self) -> VerifyCost | None:
        """The verify cost its adaptive drafts decide with (the engine refines it)."""
        return self.adaptive.cost if self.adaptive is not None else None

    def start(self, prompt_ids: list[int]) -> EagleSession:
        if self.adaptive is None:
            return EagleSession(self.head)
        return EagleSession(
            self.head, adaptive=self.adaptive, throttle=self.prior.throttle(), prior=self.prior
        )


@dataclass
class EagleSession:
    """One request's draft state: the head's keys and values over the target features
    it has taken in.

    Adaptive (``adaptive`` set): features are buffered and taken in only when the head
    drafts. It drafts nothing while its ``Throttle`` (started from the proposer's
    ``GainPrior``, what its drafts measured in earlier requests) says it does not pay; else it
    drafts greedily, token by token, and stops before a token whose probability under
    the head is below ``min_prob`` or that would not raise the expected rate
    (``VerifyCost.pays``, with c_i the product of the head's probabilities of its first
    i tokens, scaled by the calibration it measured in this request: accepted tokens
    over what it expected, capped at 1).

    Against a ``rival`` draft (the hybrid's suffix match, with its score S): the rival is
    proposed without running the head when S is at least the tokens the head's drafts
    had accepted per step in this request (``Throttle.accepted``); otherwise the head
    drafts, stops as soon as it cannot beat S (its expected accepted tokens so far plus
    c_i per remaining step), and the rival is proposed when S is at least the head's
    expected accepted tokens. Every decision depends on the committed tokens only, so
    the proposal is deterministic and lossless at any temperature."""

    head: EagleDraftHead
    keys: Tensor | None = None
    values: Tensor | None = None
    consumed: int = 0  # target positions whose features the draft has taken in
    adaptive: Adaptive | None = None
    pending: list[Tensor] = field(default_factory=list)
    throttle: Throttle = field(default_factory=Throttle)
    prior: GainPrior | None = None  # the proposer's, updated by every step's gain
    # The head's last proposal: (committed length then, tokens, draft seconds, rows,
    # the head's own expected accepted tokens)
    last: tuple[int, list[int], float, int, float] | None = None

    def propose(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
        rows: int = 1,
        rival: Draft | None = None,
    ) -> Proposal:
        """features: raw fused-layer target features [m, 3H] for the target
        positions consumed..consumed+m-1; tokens: the whole committed sequence."""
        if self.adaptive is None and rival is None:
            return self._fixed(tokens, features, k, temperature, generator)
        adaptive = self.adaptive or Adaptive(VerifyCost())
        self._learn(tokens, adaptive)
        if features is not None and features.shape[0]:
            self.pending.append(features)
        if k <= 0:
            return Proposal([])
        known = self.throttle.accepted
        if rival is not None and rival.score > 0 and known is not None and rival.score >= known:
            return _rival_proposal(rival, adaptive, rows)
        if not self.pending or not self.throttle.should_draft():
            return _rival_proposal(rival, adaptive, rows)
        cost, step_s = adaptive.cost, adaptive.draft_step_s
        trust = min(self.throttle.calibration, 1.0)
        head, device = self.head, self.pending[0].device
        g = self._take_in(tokens)
        anchor = torch.tensor([self.consumed - 1], device=device)
        score = rival.score if rival is not None else 0.0
        drafted: list[int] = []
        confidence: list[float] = []
        # c: the head's running probability; expected: the calibrated sum of them
        expected, own, c, spent = 0.0, 0.0, 1.0, step_s  # taking in costs about a step
        chain_k = chain_v = None
        for s in range(1, k + 1):
            if rival is not None and expected + trust * c * (k - s + 1) <= score:
                break  # the head cannot beat the rival any more
            p, j = torch.softmax(head.logits(g)[0].float(), dim=-1).max(dim=-1)
            spent += step_s
            c_next = c * float(p)
            if float(p) < adaptive.min_prob or not cost.pays(
                rows, len(drafted), expected, trust * c_next, spent
            ):
                break
            token = int(head.d2t[j])
            drafted.append(token)
            confidence.append(trust * c_next)
            expected, own, c = expected + trust * c_next, own + c_next, c_next
            if s == k:
                break
            g, chain_k, chain_v = head.chain(
                g,
                torch.tensor([token], device=device),
                anchor + s,
                self.keys,  # type: ignore[arg-type]
                self.values,  # type: ignore[arg-type]
                anchor,
                chain_k,
                chain_v,
            )
        if rival is not None and score > 0 and score >= expected:
            return _rival_proposal(rival, adaptive, rows)
        self.last = (len(tokens), drafted, spent, rows, own)
        return Proposal(drafted, None, confidence)

    def _learn(self, tokens: list[int], adaptive: Adaptive) -> None:
        """Score the head's last proposal now that its verify step is committed."""
        if self.last is None:
            return
        base, proposed, spent, rows, own = self.last
        self.last = None
        committed = tokens[base:]
        accepted = 0
        while accepted < min(len(proposed), len(committed) - 1) and (
            proposed[accepted] == committed[accepted]
        ):
            accepted += 1
        forwards = adaptive.cost.forwards(rows, len(proposed), spent)
        self.throttle.record((accepted + 1) / forwards, accepted, own)
        if self.prior is not None and proposed:
            self.prior.record(accepted + 1, forwards)

    def _take_in(self, tokens: list[int]) -> Tensor:
        """Run step 1 over the buffered features; the head's hidden state [1, H] at the
        last target position."""
        features = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending.clear()
        m, start = features.shape[0], self.consumed
        next_tokens = torch.tensor(tokens[start + 1 : start + m + 1], device=features.device)
        positions = torch.arange(start, start + m, device=features.device)
        past = None if self.keys is None else (self.keys, self.values)
        hidden, self.keys, self.values = self.head.step1(features, next_tokens, positions, past)  # type: ignore[arg-type]
        self.consumed = start + m
        return hidden[-1:]

    def _fixed(
        self,
        tokens: list[int],
        features: Tensor | None,
        k: int,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Proposal:
        """k tokens chained from the newest features (sampled above temperature 0)."""
        if features is None or features.shape[0] == 0 or k <= 0:
            return Proposal([])
        head = self.head
        device = features.device
        self.pending.append(features)
        g = self._take_in(tokens)
        anchor = torch.tensor([self.consumed - 1], device=device)
        chain_k = chain_v = None
        drafted: list[int] = []
        probs: list[Tensor] = []
        for s in range(1, k + 1):
            logits = head.logits(g)[0]
            if temperature > 0:
                q = tempered_probs(logits, temperature)
                j = int(torch.multinomial(q, 1, generator=generator))
                full = torch.zeros(head.config.target_vocab_size, device=device)
                full[head.d2t] = q
                probs.append(full)
            else:
                j = int(torch.argmax(logits))
            token = int(head.d2t[j])
            drafted.append(token)
            if s == k:
                break
            g, chain_k, chain_v = head.chain(
                g,
                torch.tensor([token], device=device),
                anchor + s,
                self.keys,  # type: ignore[arg-type]
                self.values,  # type: ignore[arg-type]
                anchor,
                chain_k,
                chain_v,
            )
        return Proposal(drafted, torch.stack(probs) if probs else None)


def _rival_proposal(rival: Draft | None, adaptive: Adaptive, rows: int) -> Proposal:
    """The rival's draft, cut where the expected rate peaks."""
    if rival is None or not rival.tokens:
        return Proposal([])
    n = adaptive.cost.best_length(rival.probs, rows)
    return Proposal(rival.tokens[:n], None, rival.probs[:n])
