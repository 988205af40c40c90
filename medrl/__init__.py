"""medrl: RL for medical assistants."""
__version__ = "0.1.0"

RESEARCH_NOTICE = ("Research use only, not for clinical decisions: the models medrl trains, and the figures it "
                   "reports, are research artefacts that no clinician has validated. Do not use them to diagnose, "
                   "treat or advise patients.")
"""Shown on every model card, in the report header and in the demo."""
