"""A small MNIST classifier whose penultimate features stand in for Inception's in FID (Inception judges 28x28
digits poorly, and its weights would have to come from the internet).

Train the shipped weights (fixed seed; accuracy and time are printed and recorded in docs/evaluation.md):

    python -m pipeline.classifier --dataset_name ylecun/mnist
"""

import argparse
import os
import time
from importlib import resources

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "weights/mnist_classifier.safetensors"


class MNISTClassifier(nn.Module):
    """LeNet-style CNN: two conv stages, a 128-d feature layer (the FID features) and 10 logits."""

    def __init__(self) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.conv = nn.Sequential(stage(1, 32), stage(32, 64))
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 `(N, 1, 28, 28)` or float in [0, 1] -> (128-d features, logits)."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        features = self.features(self.conv((x - 0.1307) / 0.3081))
        return features, self.head(features)


def load_classifier(path: str | os.PathLike | None = None) -> MNISTClassifier:
    """The classifier with the weights shipped in this package (or from `path`), in eval mode."""
    model = MNISTClassifier()
    if path is None:
        path = resources.files("pipeline").joinpath(WEIGHTS)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.inference_mode()
def classify(
    model: MNISTClassifier, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `(N, 128)` and class probabilities `(N, 10)` of uint8 digits `(N, 1, 28, 28)` or `(N, 28, 28)`."""
    if images.dim() == 3:
        images = images[:, None]
    features, probs = [], []
    for batch in images.split(batch_size):
        f, logits = model(batch)
        features.append(f)
        probs.append(logits.softmax(-1))
    return torch.cat(features).double(), torch.cat(probs).double()


def main(argv: list[str] | None = None) -> None:
    """Train the classifier with a fixed seed, report test accuracy, and write the weights."""
    from .data import load_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="ylecun/mnist")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), WEIGHTS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_images, train_labels = load_images(args.dataset_name, split="train")
    test_images, test_labels = load_images(args.dataset_name, split="test")
    model = MNISTClassifier()
    steps = args.epochs * (len(train_images) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images))
        for i in range(len(train_images) // args.batch_size):
            index = order[i * args.batch_size : (i + 1) * args.batch_size]
            # Random shifts of up to 2 pixels: the classifier should not care where a generated digit sits.
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            images = torch.roll(train_images[index], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(images)[1], train_labels[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        accuracy = (classify(model, test_images)[1].argmax(-1) == test_labels).double().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4%}, {time.time() - start:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(f"Wrote {args.output}: test accuracy {accuracy:.4%} after {time.time() - start:.0f} s of training")


if __name__ == "__main__":
    main()
