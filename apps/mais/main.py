"""MONAI Label app serving MAIS: click-based 3D segmentation that remembers the user's earlier clicks.

Start it with `monailabel start_server --app apps/mais --studies sample-data` (see README.md for `--conf`).
This file only wires tasks together; the model, sessions and clicks live in `lib/`.
"""

import functools
import logging
import os
import sys
import warnings

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning.tasks import DisagreementScoring, MostUncertain
from lib.background import yield_cpu_to_the_server
from lib.configs.app_settings import AppConfigError, AppSettings
from lib.datastore.dicomweb import MaisDICOMWebDatastore
from lib.datastore.local import MaisLocalDatastore
from lib.infers.mais import REQUESTED_IMAGE_KEY, MaisInfer
from lib.model.weights import WeightsError
from lib.model_loader import ModelLoader
from lib.trainers import synchronous
from lib.trainers.mais import MaisTrainer
from lib.volume_formats import VOLUME_EXTENSIONS

logger = logging.getLogger(__name__)

# MONAI warns twice each time a LoadImage is built (MONAI Label builds several per start and per training run) that
# nvImageCodec, a GPU DICOM decoder, is missing and pydicom decodes instead: what every machine without it does.
# The training subprocess loads this file too, so its log in /train/ loses the noise as well.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


class MaisApp(MONAILabelApp):
    """The app MONAI Label loads from `main.py` (it must derive from MONAILabelApp directly).

    Construction stays cheap: training runs in a subprocess that re-creates the whole app.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        yield_cpu_to_the_server()  # in MONAI Label's training or scoring process: before torch starts its threads
        try:
            self.settings = AppSettings.from_conf(conf)
            self.label_map = self.settings.label_map()
            self.model_loader = ModelLoader(self.settings)
            # Loads and checks the weights now (a light model loads in well under a second), so a bad file stops
            # the start instead of the first click.
            self.model_loader.get()
        except (AppConfigError, WeightsError) as error:
            _refuse_to_start(str(error))

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MAIS",
            description="Memory-Attention for Interactive Segmentation: 3D clicks that remember earlier clicks",
            version="0.1.0",
            # /info's top-level `labels` is a list, ordered by index, as MONAI Label builds it for apps that pass
            # none: OHIF's MONAI Label panel appends to it (`all_labels.push`) and fails to connect on a dict.
            # The model's own `labels` in /info stay the {name: index} map.
            labels=sorted(self.label_map, key=self.label_map.get),
        )
        _warn_if_no_images(studies, self.datastore().list_images())

    def init_datastore(self) -> Datastore:
        datastore = super().init_datastore()
        if type(datastore) is DICOMWebDatastore:  # --studies http(s)://.../dicom-web (not XNAT or DSA)
            # final labels go to the PACS as DICOM SEG through pydicom-seg instead of dcmqi (lib/datastore)
            return MaisDICOMWebDatastore.adopt(datastore, self.label_map)
        if type(datastore) is LocalDatastore:  # --studies <folder>: uploads are checked before they are stored
            return MaisLocalDatastore.adopt(datastore)
        return datastore

    def _download_dcmqi_tools(self) -> None:
        """MONAI Label downloads dcmqi from GitHub when it opens a DICOMweb datastore; offline that stops the
        start. This app needs no dcmqi: it writes DICOM SEG with pydicom-seg (lib/datastore/dicomweb.py)."""

    def init_infers(self) -> dict[str, InferTask]:
        return {"mais": MaisInfer(self.settings, self.label_map, self.model_loader)}

    def infer(self, request, datastore=None):
        # MONAI Label replaces the image id by the image's path before the task sees it, by "" for an id the
        # datastore does not have: the task's 404 names the id the client sent (REQUESTED_IMAGE_KEY)
        return super().infer({**request, REQUESTED_IMAGE_KEY: request.get("image")}, datastore)

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"mais": MaisTrainer(self.settings, self.label_map, self.model_loader)}

    def trainer(self, name: str) -> MaisTrainer | None:
        return self._trainers.get(name)

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if mode:  # only the server's start calls this, never the training subprocess
            # MONAI Label trains a run_sync request on the server's event loop, which then answers nothing else
            # until the run ends: run it in the background like any other run (lib/trainers/synchronous.py)
            synchronous.install()

    def on_save_label(self, image_id: str, label_id: str):
        super().on_save_label(image_id, label_id)
        self._infers["mais"].forget_image(self.datastore().get_image_uri(image_id))

    def init_strategies(self) -> dict[str, Strategy]:
        # listed first: the viewers preselect the first strategy
        return {"mais_uncertain": MostUncertain(self._disagreement), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"mais_disagreement": self._disagreement}

    @functools.cached_property
    def _disagreement(self) -> DisagreementScoring:
        """One scoring object for the strategy and the scoring method (MONAILabelApp creates the strategies first)."""
        return DisagreementScoring(self.model_loader)


def _refuse_to_start(message: str) -> None:
    """Stop the server with one clear line. Raising would make uvicorn print a traceback that buries it."""
    logger.error("MAIS cannot start: %s", message)
    print(f"MAIS cannot start: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _warn_if_no_images(studies: str, images: list) -> None:
    if not images and not studies.startswith(("http://", "https://")):
        logger.warning(
            "The studies folder %s holds no images (%s). MONAI Label creates a missing folder "
            "silently: check the --studies path, e.g. --studies sample-data.",
            studies,
            ", ".join(VOLUME_EXTENSIONS),
        )
