"""What Readout asks the demo model, and which anatomical region each question looks at."""

from __future__ import annotations

from engines.phantom import FINDING_TYPES, TOPICS
from engines.preprocess import TOPIC_REGIONS

# Finding types whose box is worth a zoomed re-look (MedVR regrounding); the others are
# organ-sized (effusions, cardiomegaly) and gain nothing from a crop.
FOCAL_TYPES = ("nodule", "mass", "hypodense lesion", "lytic lesion", "sclerotic lesion")

# The demo model's finding maps: one per finding type, in topic order, and the topic of each.
MAP_TYPES: tuple[str, ...] = tuple(kind for topic in TOPICS for kind in FINDING_TYPES[topic])
MAP_TOPICS: tuple[int, ...] = tuple(TOPICS.index(topic) for topic in TOPICS for _ in FINDING_TYPES[topic])

_QUESTION_REGIONS = (("pleural", "pleura"), ("pneumothorax", "pleura"), ("nodule", "lung"), ("lung", "lung"),
                     ("liver", "liver"), ("heart", "heart"), ("cardi", "heart"), ("bone", "bone"),
                     ("vertebra", "bone"))


def topic_region(topic: str) -> str:
    """The region mask that guides a topic (LLaVA-TA's anatomy awareness); ``body`` if unknown."""
    return TOPIC_REGIONS.get(topic.lower(), "body")


def question_region(question: str) -> str:
    """The region a question is about, from its words; ``body`` if none matches."""
    words = question.lower()
    for keyword, region in _QUESTION_REGIONS:
        if keyword in words:
            return region
    return "body"


def region_topic(region: str) -> int:
    """Index in TOPICS of the report topic whose findings ``region`` holds; -1 (any) for ``body``."""
    for topic, name in TOPIC_REGIONS.items():
        if name == region and topic in TOPICS:
            return TOPICS.index(topic)
    return -1
