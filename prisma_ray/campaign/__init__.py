"""`prisma-ray campaign`: many models through every stage on long-lived actors, then one leaderboard."""

from .config import CampaignConfig, Splits, Weights
from .state import Outcome

__all__ = ["CampaignConfig", "Outcome", "Splits", "Weights"]
