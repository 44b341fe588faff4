"""A hospital's lifetime privacy budget in words: the node's start-up line and the hint on each budget refusal.

The budget is the policy's cap per dataset, across all studies (client/policy.py ``max-epsilon``, default 8);
the privacy ledger (client/privacy.py) keeps what was spent. It never resets with a new study: a hospital that
finished one study at epsilon 8 declines every DP round of the next one on the same data. So the node says at
start-up how much of the cap its data has spent, and every refusal for budget says how the hospital raises its
own cap (a study never can).
"""

from __future__ import annotations

from pathlib import Path

from client.policy import POLICY_FILE, HospitalPolicy
from client.privacy import PrivacyLedger

# Below this share of the cap left, the start-up line warns that DP rounds will be declined.
LOW_SHARE = 0.1


def raise_cap_hint(state_dir: str | Path) -> str:
    """How a hospital lets its data spend more: its own policy, never the study."""
    return (f"the cap is this hospital's own: to raise it, set max-epsilon under [privacy] in "
            f"{Path(state_dir) / POLICY_FILE} (or start the node with --max-epsilon) and restart the node; "
            "'fedrad policy show' prints the cap in force")


def spent_on_site(state_dir: str | Path, site: str) -> float | None:
    """The largest lifetime epsilon the ledger records for training sets of ``site`` (None: none trained yet).
    A FedradError if the ledger is unreadable (the node would train nothing until it is restored)."""
    ledger = PrivacyLedger(state_dir)
    spent = [float(e.rounds[-1]["epsilon"]) for e in ledger.datasets().values() if e.name == site and e.rounds]
    return max(spent) if spent else None


def budget_line(policy: HospitalPolicy, state_dir: str | Path, site: str) -> str:
    """The start-up line's budget part: the cap, what this site's data has spent, and a warning when little is left."""
    cap = policy.max_epsilon
    spent = spent_on_site(state_dir, site)
    if spent is None:
        return f"budget: epsilon {cap:g} per dataset over all studies, none spent yet"
    left = max(cap - spent, 0.0)
    line = (f"budget: epsilon {spent:.2f} of {cap:g} already spent on this site's data (all studies), "
            f"{left:.2f} left")
    if left < LOW_SHARE * cap:
        line += f": DP rounds that would go over the cap will be declined; {raise_cap_hint(state_dir)}"
    return line
