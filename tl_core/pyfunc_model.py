"""The MLflow pyfunc model that `tl register` logs, as MLflow "models from code".

MLflow stores this file's source in the model and runs it on load, so nothing is pickled and
loading never depends on a class path saved with the model (mlflow#10766). The weights are the
tl checkpoint (`checkpoint.pt`: state_dict + model spec + data statistics), stored beside it as
an artifact; the network is rebuilt from the spec. Loading needs `tl_core` importable.

`predict` takes raw images, uint8 or float, N x H x W, N x C x H x W or N x H x W x C, of any
size, and prepares them exactly as training did: the data sources' conversion to uint8 (floats
in [0, 1] are fractions of white, larger floats are scaled by the batch's maximum), channel
conversion, resize, and normalisation with the training data's mean and std. It returns one row
per image: the class name, its probability, and the probability of every class (`p_<class>`).

It also takes image files as they are, JPEG or PNG bytes: a 1-D object array of `bytes` (what
the signature lets through; in-process, a list or a DataFrame with an `image` column too). A model trained on photos (a dataset stored as its
files) decodes them and crops the centre as its evaluation did (Resize, CenterCrop); any other
decodes and resizes them.

A text model's `predict` takes raw strings: a DataFrame with a `text` column (as its signature
says), a list or a 1-D array of strings. They go in as its training texts did, as UTF-8 bytes;
the tokenizer is inside the checkpoint's state_dict (`tl_core.models.text`).

Served by MLflow (`mlflow models serve`, `mlflow.models.predict`), the model gets what MLflow's
scoring server parsed from JSON, which has no bytes and no dtypes: the image signature (an
any-shape object tensor) hands `{"inputs": ...}` over as an object array, so `predict` also takes
  - nested lists of pixel numbers, N x H x W or N x H x W x C (integers 0-255 are uint8 pixels;
    other numbers go through the same conversion as float arrays), and
  - strings: base64 of image files (PNG, JPEG), `{"inputs": ["iVBORw0KGgo..."]}`, also as a
    one-column `dataframe_split`.
A text model's `text` column signature takes `{"inputs": ["a text", ...]}` and
`{"dataframe_split": {"columns": ["text"], "data": [["a text"]]}}`. README "Serving" shows both.
"""

import base64
import binascii

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from tl_core.checkpoints import load_checkpoint, load_state
from tl_core.data import normalise
from tl_core.data.prepare import decode_images
from tl_core.data.sources import as_uint8_images  # the conversion training data went through
from tl_core.data.text import to_byte_rows
from tl_core.data.transforms import convert_channels, decode_file, resize
from tl_core.errors import UserError
from tl_core.models import build_from_spec, predict_logits

FILE_TYPES = (bytes, bytearray, memoryview, np.bytes_)


def _items(images) -> list | None:
    """The items of a 1-D input (a list, a Series, a 1-D array, a one-column table or N x 1 array,
    as MLflow's scoring server makes of a column), else None."""
    if isinstance(images, pd.DataFrame):
        images = images["image"] if "image" in images.columns else images.iloc[:, 0]
    if isinstance(images, np.ndarray) and images.ndim == 2 and images.shape[1] == 1 and images.dtype == object:
        images = images[:, 0]
    if isinstance(images, (list, tuple, pd.Series)) or (isinstance(images, np.ndarray) and images.ndim == 1):
        return list(images)
    return None


def image_files(images) -> list[bytes] | None:
    """Encoded image files where the input is a sequence of them, else None: `bytes` as they are,
    strings as base64 (JSON has no bytes: what a client sends through MLflow's scoring server)."""
    items = _items(images)
    if not items:
        return None
    if all(isinstance(item, FILE_TYPES) for item in items):
        return [bytes(item) for item in items]
    if all(isinstance(item, str) for item in items):
        return [from_base64(item, f"model input {i}") for i, item in enumerate(items)]
    return None


def from_base64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is a string but not base64 (this model classifies images, not texts): send an "
                        "image file (PNG, JPEG) as base64, or the pixels as numbers") from None
    if not data:
        raise UserError(f"{what} is empty: send an image file (PNG, JPEG) as base64")
    return data


def pixel_numbers(images) -> np.ndarray:
    """Pixels as an array of numbers. MLflow's scoring server parses JSON lists into an object
    array (the signature's dtype): its numbers become a numeric array here, integers 0-255 as
    uint8 pixels (JSON says nothing of the dtype; that is what an image's numbers are)."""
    x = np.asarray(images)
    if x.dtype != object:
        return x
    try:
        x = np.asarray(x.tolist())
    except ValueError:
        raise UserError("model input: the images are nested lists of different lengths; send N images of one size, "
                        "N x H x W or N x H x W x C") from None
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise UserError(f"model input: images must be numbers (pixels) or base64 image files, not {x.dtype} values")
    if x.dtype.kind in "iu" and x.size and x.min() >= 0 and x.max() <= 255:
        x = x.astype(np.uint8)
    return x


def texts_of(model_input) -> list[str]:
    """Raw strings of a text model's input: a `text` column (a DataFrame, or the dict of columns the
    scoring server parses), or a sequence of strings."""
    if isinstance(model_input, dict):
        model_input = model_input["text"] if "text" in model_input else next(iter(model_input.values()), [])
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input["text"] if "text" in model_input.columns else model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    return [str(t) for t in np.asarray(model_input, dtype=object).reshape(-1)]


class ClassifierModel(PythonModel):
    def load_context(self, context):
        self.use_checkpoint(load_checkpoint(context.artifacts["checkpoint"]), context.artifacts["checkpoint"])

    def use_checkpoint(self, checkpoint: dict, uri: str) -> "ClassifierModel":
        """Build the network of a loaded (and checked) checkpoint: what `tl serve` also answers with."""
        self.checkpoint = checkpoint
        self.model = build_from_spec(self.checkpoint["model_spec"])
        load_state(self.model, self.checkpoint["model"], uri)
        self.model.eval()
        self.classes = list(self.checkpoint["data"]["classes"])
        return self

    @property
    def takes_text(self) -> bool:
        return self.checkpoint["data"].get("stored") == "text"

    def prepare(self, images) -> torch.Tensor:
        channels, height, width = self.checkpoint["data"]["shape"]
        if self.takes_text:
            return to_byte_rows(texts_of(images), width)
        files = image_files(images)
        if files is not None and self.checkpoint["data"].get("stored") == "files":
            return normalise(decode_images(files, self.checkpoint["data"]), self.checkpoint["data"])
        if files is not None:
            x = np.stack([resize(decode_file(f, channels, "model input")[None].numpy(), (height, width))[0]
                          for f in files])
            return normalise(x, self.checkpoint["data"])
        x = as_uint8_images(pixel_numbers(images), "model input")
        x = resize(convert_channels(x, channels), (height, width))
        return normalise(x, self.checkpoint["data"])  # with the training data's mean and std

    # An ndarray hint: MLflow then neither infers a schema from it nor warns that hints are missing.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:  # or texts (see above)
        probs = self.probabilities(self.prepare(model_input))
        best = probs.argmax(axis=1)
        table = pd.DataFrame({"label": [self.classes[i] for i in best], "probability": probs.max(axis=1)})
        for i, name in enumerate(self.classes):
            table[f"p_{name}"] = probs[:, i]
        return table

    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities (N x classes) of prepared inputs."""
        with torch.no_grad():
            logits = predict_logits(self.model, x, torch.device("cpu"))
        return torch.softmax(logits, dim=1).numpy()


mlflow.models.set_model(ClassifierModel())
