"""The PNG `odpo up --rounds N` leaves in the run folder: held-out score and DPO reward margin per version,
and below it the quality signals per version (length against base, on-topic share, strict pass, fluency), so a
score that rises while the answers get worse shows."""

from __future__ import annotations

from pathlib import Path


def plot_versions(rows: list[dict], out: Path) -> Path:
    """Held-out score per version (promoted ones filled, refused ones red) and the trainer's reward margin."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    fig, (score_ax, quality_ax) = plt.subplots(2, 1, figsize=(7, 7), dpi=120, sharex=True)
    scored = [r for r in rows if r["score"] is not None]
    score_ax.plot([r["version"] for r in scored], [r["score"] for r in scored], color="tab:blue", marker="o",
                  label="held-out score")
    with_ci = [r for r in scored if r.get("score_ci")]
    if with_ci:
        score_ax.fill_between([r["version"] for r in with_ci], [r["score_ci"]["low"] for r in with_ci],
                              [r["score_ci"]["high"] for r in with_ci], color="tab:blue", alpha=0.15,
                              label="95% interval")
    refused = [r for r in scored if r["status"] in ("refused", "failed")]
    if refused:
        score_ax.scatter([r["version"] for r in refused], [r["score"] for r in refused], color="tab:red", marker="x",
                         s=80, zorder=3, label="not promoted")
    promoted = [r for r in scored if r["promoted"]]
    if promoted:
        score_ax.scatter([r["version"] for r in promoted], [r["score"] for r in promoted], facecolors="none",
                         edgecolors="black", s=140, zorder=3, label="promoted now")
    score_ax.set_ylabel("held-out verifier score", color="tab:blue")
    score_ax.set_ylim(0, 1)

    margin_ax = score_ax.twinx()
    margins = [r for r in rows if r["reward_margin"] is not None]
    margin_ax.bar([r["version"] for r in margins], [r["reward_margin"] for r in margins], width=0.35,
                  color="tab:orange", alpha=0.5, label="DPO reward margin")
    margin_ax.set_ylabel("DPO reward margin (training window)", color="tab:orange")
    score_ax.set_xticks([r["version"] for r in rows])
    score_ax.set_zorder(margin_ax.get_zorder() + 1)  # the score line over the margin bars
    score_ax.patch.set_visible(False)

    handles = score_ax.get_legend_handles_labels()[0] + margin_ax.get_legend_handles_labels()[0]
    score_ax.legend(handles=handles, loc="upper left", fontsize="small")
    score_ax.set_title("odpo up: held-out score and reward margin per version")
    _quality_panel(quality_ax, scored)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def _quality_panel(ax, scored: list[dict]) -> None:
    """Length relative to base, on-topic share and strict pass (left), reference log-prob per token (right)."""
    versions = [r["version"] for r in scored]
    base_words = next((r.get("mean_words") for r in scored if r["version"] == 0), None)
    series = [("on_topic_share", "on-topic share", "tab:green"), ("strict_pass", "strict pass", "tab:purple")]
    for key, label, color in series:
        pts = [(r["version"], r.get(key)) for r in scored if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
    if base_words:
        pts = [(r["version"], r["mean_words"] / base_words) for r in scored if r.get("mean_words") is not None]
        ax.plot(*zip(*pts), marker="s", color="tab:brown", label="mean words / base's")
    ax.axhline(1.0, color="gray", lw=0.6, ls=":")
    ax.set_ylim(0, 1.6)
    ax.set_ylabel("share / ratio")
    ax.set_xlabel("policy version (0 = base)")
    lp_ax = ax.twinx()
    pts = [(r["version"], r.get("ref_logprob")) for r in scored if r.get("ref_logprob") is not None]
    if pts:
        lp_ax.plot(*zip(*pts), marker="^", color="tab:gray", ls="--", label="ref log-prob / token")
    lp_ax.set_ylabel("base model log-prob per token", color="tab:gray")
    handles = ax.get_legend_handles_labels()[0] + lp_ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize="x-small")
    ax.set_title("quality of the held-out answers (a gamed judge shows here)", fontsize="small")
    if versions:
        ax.set_xticks(versions)
