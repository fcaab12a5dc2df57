"""The GPU benchmark's models, built in code with random weights (no downloads): a ResNet-50
taking uint8 224×224×3 images (scaling and normalisation inside the model) and a BERT-base-like
encoder taking token ids. Plain torch, so no torchvision is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve.testing.models import write_config


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inplanes != out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]  # fmt: skip
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip(widths, (3, 4, 6, 3), strict=True)):
            for j in range(blocks):
                layers.append(Bottleneck(inplanes, planes, 2 if j == 0 and i > 0 else 1))
                inplanes = planes * 4
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ImageClassifier(nn.Module):
    """uint8 NHWC images in, logits (fp32) out; the network runs in ``dtype``."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.net(x.to(self.dtype)).float()


class Encoder(nn.Module):
    """BERT-base-like: token + position embeddings, 12 × (768, 12 heads, 3072), CLS vector."""

    def __init__(
        self, layers: int = 12, width: int = 768, vocab: int = 30522, seq: int = 128
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(1, seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 12, 4 * width, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.tokens(ids) + self.positions).float()[:, 0]


def image_model(device: str, dtype: torch.dtype, size: int, small: bool) -> nn.Module:
    torch.manual_seed(0)
    net = ResNet50(widths=(8, 16, 32, 64)) if small else ResNet50()
    return ImageClassifier(net, dtype).eval().to(device)


def text_model(device: str, dtype: torch.dtype, small: bool, seq: int) -> nn.Module:
    torch.manual_seed(1)
    model = Encoder(layers=2, width=96, seq=seq) if small else Encoder(seq=seq)
    return (
        model.eval().to(device=device, dtype=dtype)
        if dtype != torch.float32
        else model.eval().to(device)
    )


def save_model_folder(
    folder: Path, name: str, module: nn.Module, example: torch.Tensor, config: dict[str, Any]
) -> Path:
    """Trace ``module`` into TorchScript and write a model folder for warmserve."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(str(folder / "model.pt"))
    return write_config(
        folder, {"name": name, "backend": "torch", "model_file": "model.pt", **config}
    )
