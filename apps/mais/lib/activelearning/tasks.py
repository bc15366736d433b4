"""Active learning in MONAI Label terms: a scoring method that records each unlabelled image's disagreement
score in the datastore, and the strategy `mais_uncertain` that hands out the image the model is least sure of.

MONAI Label runs every scoring method in a background process after start-up, after each training run and after
each `next_sample`, so scores follow the served weights; a score records which weights made it, and a stale one
is recomputed. The strategy scores inline only what the background run has not reached yet (a few images at
most per request: a score takes a second or two on a CPU and blocks the server meanwhile).
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.disagreement import ProbeConfig, image_disagreement
from lib.imaging import ModelSpaceImage, VolumeError
from lib.model_loader import ModelLoader

logger = logging.getLogger(__name__)

SCORE_KEY = "mais_disagreement"
WEIGHTS_KEY = "mais_disagreement_weights"
# Most images a `next_sample` request scores itself before answering.
MAX_INLINE_SCORES = 4


class DisagreementScoring(ScoringMethod):
    def __init__(self, model_loader: ModelLoader, probes: ProbeConfig | None = None):
        super().__init__("MAIS: disagreement of nearby automatic clicks on each unlabelled image (active learning)")
        self.model_loader = model_loader
        self.probes = probes or ProbeConfig()

    def current_score(self, datastore: Datastore, image_id: str) -> float | None:
        """The image's recorded score if the served weights made it, else None."""
        info = datastore.get_image_info(image_id)
        return info.get(SCORE_KEY) if info.get(WEIGHTS_KEY) == self.model_loader.get().version else None

    def score(self, datastore: Datastore, image_id: str) -> float | None:
        """Compute, record and return the image's score; None (logged) for an image that is not a 3D volume."""
        model, version = self.model_loader.get()  # one value: a publish meanwhile must not relabel the score
        try:
            image = ModelSpaceImage.from_file(datastore.get_image_uri(image_id))
        except VolumeError as error:
            logger.warning("%s: not scored: %s", image_id, error)
            return None
        value = round(image_disagreement(model, image, self.probes), 5)
        datastore.update_image_info(image_id, {SCORE_KEY: value, WEIGHTS_KEY: version})
        logger.info("%s: %s %.4f", image_id, SCORE_KEY, value)
        return value

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        scores = {}
        for image_id in datastore.get_unlabeled_images():
            current = self.current_score(datastore, image_id)
            scores[image_id] = current if current is not None else self.score(datastore, image_id)
        return {"method": SCORE_KEY, "weights": self.model_loader.get().version, "scores": scores}


class MostUncertain(Strategy):
    """Next image to label: the unlabelled one with the highest disagreement score (see DisagreementScoring)."""

    def __init__(self, scoring: DisagreementScoring):
        super().__init__("MAIS: the unlabelled image the model is least sure of (disagreement of nearby clicks)")
        self.scoring = scoring

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        scores = {image_id: self.scoring.current_score(datastore, image_id) for image_id in images}
        for image_id in [i for i, s in scores.items() if s is None][:MAX_INLINE_SCORES]:
            scores[image_id] = self.scoring.score(datastore, image_id)
        scored = {image_id: s for image_id, s in scores.items() if s is not None}
        if not scored:
            return None
        chosen = max(scored, key=scored.get)
        logger.info("next sample: %s (%s %.4f of %d scored images)", chosen, SCORE_KEY, scored[chosen], len(scored))
        return {"id": chosen, SCORE_KEY: scored[chosen]}
