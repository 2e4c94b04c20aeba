"""What a decoder reports: :class:`GenerationStats` (the project's one definition of τ) and
:class:`GenerationResult`."""
from __future__ import annotations

from dataclasses import dataclass, field

from multitoken.decoding.batch import Tracker


@dataclass
class GenerationStats:
    new_tokens: int = 0  # tokens emitted, all rows
    forward_passes: int = 0  # target-model passes (prefill included)
    draft_forward_passes: int = 0  # separate draft-model passes (mode="draft")
    tau: float = 0.0  # tokens per target pass per row (bonus token included): see mean_accept_length
    acceptance_rates: list[float] = field(default_factory=list)  # P(draft i accepted | drafts < i accepted)
    draft_attempted: list[int] = field(default_factory=list)  # per draft position: row-steps that verified it
    draft_accepted: list[int] = field(default_factory=list)  # ... and accepted it
    drafts_per_step: float = 0.0  # mean drafts verified per row-step (< num_draft with draft_cost)
    accepted_histogram: list[int] = field(default_factory=list)  # verify steps that accepted j drafts
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    tree_nodes_per_step: float = 0.0  # mode="tree": mean verified nodes per step
    draft_lengths: list[int] = field(default_factory=list)  # verify steps by draft length chosen (0..num_draft)
    tree_nodes: int = 0  # mode="tree", static tree: its draft nodes (root excluded), as chosen
    chosen_by: str = ""  # how draft lengths / the tree were chosen (see multitoken.decoding.defaults)
    prompt_lookup: int = 0  # mode="tree": the longest prompt-lookup chain a step could graft (0 = off)
    lookup_tokens: int = 0  # ... and the accepted drafts that only lookup proposed

    @staticmethod
    def mean_accept_length(tokens: int, row_passes: int) -> float:
        """τ: tokens emitted per target forward pass of a row, bonus token and prefill included
        (plain decoding has τ = 1). Pooled results (several prompts) pass their sums."""
        return tokens / max(row_passes, 1)

    @classmethod
    def from_tracker(cls, tracker: Tracker, wall_s: float) -> "GenerationStats":
        """The statistics of a finished decode whose counters ``tracker`` holds."""
        new_tokens = sum(len(o) for o in tracker.out)
        return cls(
            new_tokens=new_tokens, forward_passes=tracker.forward_passes,
            draft_forward_passes=tracker.draft_forward_passes,
            tau=cls.mean_accept_length(new_tokens, tracker.row_passes),
            acceptance_rates=[a / t if t else 0.0 for a, t in zip(tracker.accepted, tracker.attempted)],
            draft_attempted=tracker.attempted, draft_accepted=tracker.accepted,
            drafts_per_step=tracker.drafted / max(tracker.row_passes, 1),
            accepted_histogram=tracker.histogram,
            tokens_per_s=new_tokens / wall_s if wall_s > 0 else 0.0, wall_s=wall_s,
            tree_nodes_per_step=tracker.node_sum / tracker.node_steps if tracker.node_steps else 0.0,
            draft_lengths=tracker.depths, lookup_tokens=tracker.lookup_tokens,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (EOS included if hit)
    stats: GenerationStats
