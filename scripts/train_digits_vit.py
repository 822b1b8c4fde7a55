"""Train the small ViT of the digits accuracy test (tests/data/digits_vit.safetensors).

    python scripts/train_digits_vit.py [--epochs 40] [--output tests/data/digits_vit.safetensors]

The committed file came from this command with the defaults: held-out accuracy 97.78% (352 of 360).

A 3-block, 64-wide ViT (patch 8 on 32x32 images, 16 tokens + class token, about 0.1M parameters)
trained with AdamW on the 1,437 training images of scikit-learn's digits (tests/digits.py: every
fifth image is held out), each image preprocessed exactly as the exported model's metadata says
(the PNG written by tests/digits.py, resized and normalised by vitdeploy.preprocessing), with
small random shifts as augmentation. CPU only, one thread, about a minute of CPU time; it prints the held-out
accuracy and saves the weights in the native format (config in the safetensors metadata).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import digits  # noqa: E402  (tests/digits.py: the data set and the model config)


def pixels(indices: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Preprocessed ``[N, 3, 32, 32]`` float32 inputs, through the same path the artifact's users take."""
    from vitdeploy.config import ViTConfig
    from vitdeploy.preprocessing import preprocess

    config = ViTConfig.from_fields(digits.MODEL_CONFIG)
    pre = config.preprocessing.at(config.image_size)
    return np.stack([preprocess(digits.to_picture(images[i]), pre) for i in indices])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=digits.WEIGHTS)
    args = parser.parse_args()

    import torch

    from vitdeploy.checkpoints.native import save_model
    from vitdeploy.config import ViTConfig
    from vitdeploy.model import VisionTransformer

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # one thread: on a shared 2-core machine two spin-wait against other processes
    images, labels = digits.digits()
    train, test = digits.split(len(images))
    x_train, y_train = torch.from_numpy(pixels(train, images)), torch.from_numpy(labels[train])
    x_test, y_test = torch.from_numpy(pixels(test, images)), torch.from_numpy(labels[test])
    model = VisionTransformer(ViTConfig.from_fields(digits.MODEL_CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * ((len(train) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train))
        for start in range(0, len(train), 64):
            batch = order[start:start + 64]
            shift = [int(v) for v in torch.randint(-2, 3, (2,))]
            inputs = torch.roll(x_train[batch], shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(inputs), y_train[batch], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {100 * accuracy:.2f}%")
    model.eval()
    save_model(model, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
