"""Candidate rules for "no expert applies", measured against each other on held-out prompts.

Every rule sees only what a server has: the experts' card embeddings and the
bundled generic prompts (loramux/router/data/generic_prompts.txt). Each has
one setting, swept to trace its trade-off between task prompts routed to the
right expert and general prompts left to the base model:

- global_threshold: one cosine threshold for all experts (loramux before this rule).
- per_expert_threshold: a cosine threshold per expert, between the top of the
  generic prompts' similarities to its key (99th percentile) and the lowest
  leave-one-out similarity of its own card texts; setting = where between (0..1).
- base_key_margin: a "base model" pseudo-expert keyed by the mean of the
  generic prompts; an expert wins when it beats that key by the setting.
- classifier: logistic regression on embeddings, card texts vs generic prompts;
  setting = the logit above which a prompt goes to its nearest expert.
- generic_margin: the expert must beat the mean of the prompt's 3 nearest
  generic prompts by the setting (one margin for all experts).
- calibrated_margin (loramux's rule): the same with each expert's margin capped
  by its own card's lowest leave-one-out margin (loramux/router/calibration.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from loramux.router.calibration import card_margin, generic_similarity, leave_one_out_similarities
from loramux.router.index import key_of

SETTINGS = {
    "global_threshold": [0.6 + i / 50 for i in range(0, 9)],
    "per_expert_threshold": [i / 10 for i in range(0, 11)],
    "base_key_margin": [i / 100 for i in range(-10, 21, 2)],
    "classifier": [i / 2 for i in range(-6, 7)],
    "generic_margin": [i / 100 for i in range(-4, 17, 2)],
    "calibrated_margin": [i / 100 for i in range(-4, 17, 2)],
}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression by L-BFGS: x [N, D], y [N] in {0, 1} -> (w [D], b [1])."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)
    pos_weight = (y == 0).sum() / (y == 1).sum()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight)
        loss = loss + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


class RuleScores:
    """For a set of query embeddings [N, D]: each rule's accept decision at a setting -> [N] bool, and the
    nearest expert [N]."""

    def __init__(self, cards: dict[str, torch.Tensor], generic: torch.Tensor):
        self.names = list(cards)
        self.generic = generic
        self.keys = torch.stack([key_of(card) for card in cards.values()])  # [E, D]
        generic_to_keys = generic @ self.keys.T  # [G, E]
        self.threshold_low = torch.quantile(generic_to_keys, 0.99, dim=0)  # [E]
        self.threshold_high = torch.tensor([float(leave_one_out_similarities(c).min()) if len(c) > 1 else 1.0
                                            for c in cards.values()])
        self.base_key = key_of(generic)
        self.card_margins = torch.tensor([card_margin(c, generic) for c in cards.values()])
        positives = torch.cat(list(cards.values()))
        self.w, self.b = fit_logistic(torch.cat([positives, generic]),
                                      torch.cat([torch.ones(len(positives)), torch.zeros(len(generic))]))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best similarity [N], index of the best expert [N])."""
        return (queries @ self.keys.T).max(1)

    def accept(self, rule: str, setting: float, queries: torch.Tensor) -> torch.Tensor:
        best, index = self.nearest(queries)
        if rule == "global_threshold":
            return best >= setting
        if rule == "per_expert_threshold":
            threshold = (1 - setting) * self.threshold_low + setting * self.threshold_high
            return best >= threshold[index]
        if rule == "base_key_margin":
            return best - queries @ self.base_key >= setting
        if rule == "classifier":
            return queries @ self.w + self.b > setting
        margin = best - generic_similarity(queries, self.generic)
        if rule == "generic_margin":
            return margin >= setting
        if rule == "calibrated_margin":
            return margin >= torch.clamp(self.card_margins, max=setting)[index]
        raise ValueError(rule)


def sweep(scores: RuleScores, task_queries: torch.Tensor, task_labels: list[str],
          general_queries: torch.Tensor) -> dict[str, list[dict]]:
    """Per rule and setting: the share of task prompts routed to the right expert and of general prompts
    left to the base model."""
    _, index = scores.nearest(task_queries)
    right = torch.tensor([scores.names[i] == label for i, label in zip(index.tolist(), task_labels)])
    out = {}
    for rule, settings in SETTINGS.items():
        out[rule] = [{"setting": s,
                      "task_routed_right": float((scores.accept(rule, s, task_queries) & right).float().mean()),
                      "general_to_base": float((~scores.accept(rule, s, general_queries)).float().mean())}
                     for s in settings]
    return out


def best_point(points: list[dict]) -> dict:
    """The setting with the highest sum of the two rates (ties: the first)."""
    return max(points, key=lambda p: p["task_routed_right"] + p["general_to_base"])


def plot_tradeoff(sweeps: dict[str, list[dict]], default_setting: float, path: Path) -> None:
    """Left: every rule's trade-off curve over its setting. Right: loramux's rule against its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for rule, points in sweeps.items():
        left.plot([p["general_to_base"] for p in points], [p["task_routed_right"] for p in points], "o-",
                  markersize=3, label=rule, linewidth=2.5 if rule == "calibrated_margin" else 1.2)
    left.axhline(0.95, color="grey", linestyle=":")
    left.axvline(0.90, color="grey", linestyle=":")
    left.set_xlim(0.6, 1.01)
    left.set_ylim(0.75, 1.01)
    left.set_xlabel("general prompts answered by the base model")
    left.set_ylabel("task prompts routed to the right expert")
    left.set_title("candidate rules, each swept over its setting")
    left.legend(fontsize=8, loc="lower left")
    points = sweeps["calibrated_margin"]
    settings = [p["setting"] for p in points]
    right.plot(settings, [p["task_routed_right"] for p in points], "o-", label="task prompts routed right")
    right.plot(settings, [p["general_to_base"] for p in points], "s-", label="general prompts to the base model")
    right.axvline(default_setting, color="black", linestyle="--", label=f"default {default_setting:g}")
    right.set_xlabel("--router-margin (cap of each expert's calibrated margin)")
    right.set_ylim(0, 1.02)
    right.set_title("calibrated_margin (loramux) over its setting")
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
