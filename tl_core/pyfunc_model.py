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
"""

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
from tl_core.models import build_from_spec, predict_logits


def image_files(images) -> list[bytes] | None:
    """Encoded image files (bytes) where the input is a sequence of them, else None."""
    if isinstance(images, pd.DataFrame):
        images = images["image"] if "image" in images.columns else images.iloc[:, 0]
    items = list(images) if isinstance(images, (list, tuple, pd.Series)) or (
        isinstance(images, np.ndarray) and images.ndim == 1) else None
    if not items or not all(isinstance(item, (bytes, bytearray, memoryview, np.bytes_)) for item in items):
        return None
    return [bytes(item) for item in items]


class ClassifierModel(PythonModel):
    def load_context(self, context):
        self.checkpoint = load_checkpoint(context.artifacts["checkpoint"])
        self.model = build_from_spec(self.checkpoint["model_spec"])
        load_state(self.model, self.checkpoint["model"], context.artifacts["checkpoint"])
        self.model.eval()
        self.classes = list(self.checkpoint["data"]["classes"])

    def prepare(self, images) -> torch.Tensor:
        channels, height, width = self.checkpoint["data"]["shape"]
        if self.checkpoint["data"].get("stored") == "text":
            texts = images["text"] if isinstance(images, pd.DataFrame) else images
            return to_byte_rows([str(t) for t in list(texts)], width)
        files = image_files(images)
        if files is not None and self.checkpoint["data"].get("stored") == "files":
            return normalise(decode_images(files, self.checkpoint["data"]), self.checkpoint["data"])
        if files is not None:
            x = np.stack([resize(decode_file(f, channels, "model input")[None].numpy(), (height, width))[0]
                          for f in files])
            return normalise(x, self.checkpoint["data"])
        x = as_uint8_images(np.asarray(images), "model input")
        x = resize(convert_channels(x, channels), (height, width))
        return normalise(x, self.checkpoint["data"])  # with the training data's mean and std

    # An ndarray hint: MLflow then neither infers a schema from it nor warns that hints are missing.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:  # or texts (see above)
        with torch.no_grad():
            logits = predict_logits(self.model, self.prepare(model_input), torch.device("cpu"))
        probs = torch.softmax(logits, dim=1).numpy()
        best = probs.argmax(axis=1)
        table = pd.DataFrame({"label": [self.classes[i] for i in best], "probability": probs.max(axis=1)})
        for i, name in enumerate(self.classes):
            table[f"p_{name}"] = probs[:, i]
        return table


mlflow.models.set_model(ClassifierModel())
