"""Text teachers: a sentence-transformers model, or a Hugging Face encoder (mean-pooled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..environment import require
from ..errors import DataError
from .base import TextTeacher, freeze, from_hub


class SentenceTransformerTeacher(TextTeacher):
    """A sentence-transformers model from a local folder, or (``hub=True``) by its hub name through
    the library's own cache (``all-MiniLM-L6-v2``, ``ORG/REPO``)."""

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", hub: bool = False) -> None:
        require("teachers")
        from sentence_transformers import SentenceTransformer

        self.name = name or f"sentence-transformers:{path}"
        if hub:
            self.model = from_hub(self.name, lambda: SentenceTransformer(str(path), device=device),
                                  "sentence-transformers:<local folder>")
        else:
            try:
                self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
            except Exception as exc:  # not a sentence-transformers folder, missing files...
                raise DataError(f"cannot load sentence-transformers model from {path}: {str(exc).splitlines()[0]}") from None
        freeze(self.model)
        self.device = device
        self.dim = int(self._forward(["a"]).shape[-1])

    def _forward(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(
            texts,
            batch_size=max(1, len(texts)),
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )


class HFTextTeacher(TextTeacher):
    """A Hugging Face encoder (``AutoModel``) from a local folder, or (``hub=True``) a hub repository
    through transformers' cache; features are the mean of the token states over the mask."""

    model: torch.nn.Module  # set in __init__ (the base class allows None)

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", max_length: int = 256,
                 hub: bool = False) -> None:
        require("teachers")  # brings transformers
        from transformers import AutoModel, AutoTokenizer

        def load() -> tuple[Any, torch.nn.Module]:
            return (AutoTokenizer.from_pretrained(str(path), local_files_only=not hub),
                    AutoModel.from_pretrained(str(path), local_files_only=not hub))

        if hub:
            self.tokenizer, model = from_hub(name or f"hf:{path}", load, "hf:<local folder>")
        else:
            try:
                self.tokenizer, model = load()
            except Exception as exc:
                raise DataError(f"cannot load Hugging Face model from {path}: {str(exc).splitlines()[0]}") from None
        self.model = freeze(model).to(device)
        # Some tokenizers report a huge sentinel as their limit; the position table is the real one.
        limits = [max_length, int(getattr(self.tokenizer, "model_max_length", max_length) or max_length)]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        self.max_length = min(limits)
        self.name = name or f"hf:{path}"
        self.device = device
        self.dim = int(getattr(self.model.config, "hidden_size"))

    def _forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)

