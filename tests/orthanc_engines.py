"""A fast engine of known output for the Orthanc flow tests (the demo engine is tested in test_engine.py).

It "finds" one nodule in a box at the centre of the volume, so every read has an SR and a SEG
whose content the tests can predict, without loading torch weights in each runner.
"""

from __future__ import annotations

import time

from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult
from engines.volume import Volume


class CentreBoxEngine:
    info = EngineInfo(name="centre-box", version="1.0.0")

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds  # how long a read takes: room for the tests to kill things mid-job

    def run(self, volume: Volume, request) -> StudyResult:
        time.sleep(self.seconds)
        d, h, w = volume.shape
        box = Box((d // 2 - 1, h // 2 - 4, w // 2 - 4, d // 2 + 2, h // 2 + 4, w // 2 + 4))
        topics = []
        for topic in request.topics:
            if topic == "lungs":
                finding = Finding(type="nodule", text="Test nodule at the centre of the volume.", size_mm=8.0,
                                  location="right upper lobe", confidence=0.9, box=box)
                topics.append(TopicResult(topic, normal=False, findings=[finding]))
            else:
                topics.append(TopicResult(topic, normal=True, text=f"No {topic} finding (test engine)."))
        answers = [Answer(q, "no", confidence=0.5) for q in request.questions]
        return StudyResult(volume.series_instance_uid, self.info, topics, answers)


def create(seconds: float = 0.0) -> CentreBoxEngine:
    return CentreBoxEngine(seconds)
