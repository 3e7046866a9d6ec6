"""The PNG `odpo up --rounds N` leaves in the run folder: held-out score and DPO reward margin per version."""

from __future__ import annotations

from pathlib import Path


def plot_versions(rows: list[dict], out: Path) -> Path:
    """Held-out score per version (promoted ones filled, refused ones red) and the trainer's reward margin."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    fig, score_ax = plt.subplots(figsize=(7, 4), dpi=120)
    scored = [r for r in rows if r["score"] is not None]
    score_ax.plot([r["version"] for r in scored], [r["score"] for r in scored], color="tab:blue", marker="o",
                  label="held-out score")
    refused = [r for r in scored if r["status"] in ("refused", "failed")]
    if refused:
        score_ax.scatter([r["version"] for r in refused], [r["score"] for r in refused], color="tab:red", marker="x",
                         s=80, zorder=3, label="not promoted")
    promoted = [r for r in scored if r["promoted"]]
    if promoted:
        score_ax.scatter([r["version"] for r in promoted], [r["score"] for r in promoted], facecolors="none",
                         edgecolors="black", s=140, zorder=3, label="promoted now")
    score_ax.set_xlabel("policy version (0 = base)")
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
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
