"""The procedural world of the testbed: 32x32 RGB scenes with ground-truth labels.

A scene is one shape, in one colour and one style, on a background, optionally under an overlay that
plays the role of inappropriate content (blood splatter or fire). The attribute values are the labels;
the layout (position, size, rotation, pattern phase, overlay geometry) is jitter drawn from a seeded
numpy Generator, so the same seed always gives the same pixels.

Rendering is vectorised over a batch and supersampled 2x (drawn at 64x64, averaged to 32x32) so edges
are anti-aliased like a real image rather than aliased binary masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
SUPERSAMPLE = 2
_CANVAS = IMAGE_SIZE * SUPERSAMPLE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "crescent")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
STYLES: tuple[str, ...] = ("plain", "striped", "checkered", "sketch")
BACKGROUNDS: tuple[str, ...] = ("white", "grey", "sky", "sand")
OVERLAYS: tuple[str, ...] = ("none", "blood", "fire")

# One classification head per attribute; the order of values is the label index.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "style": STYLES,
    "overlay": OVERLAYS,
    "background": BACKGROUNDS,
}

# Overlays are the concepts to erase; they are over-represented so a model sees them often.
OVERLAY_PROBABILITIES: dict[str, float] = {"none": 0.6, "blood": 0.2, "fire": 0.2}

# Saturated shape colours, kept away from the dark red of blood (~130,10,15) and from the
# yellow-orange gradient of fire, so colour and overlay stay separable.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (228, 32, 40),
    "green": (34, 160, 60),
    "blue": (36, 84, 222),
    "yellow": (246, 212, 30),
    "purple": (140, 56, 180),
    "orange": (250, 130, 20),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 246),
    "grey": (150, 150, 150),
    "sky": (176, 212, 242),
    "sand": (222, 200, 150),
}
_BLOOD_RGB = np.array([128.0, 8.0, 14.0])
_FIRE_BASE_RGB = np.array([255.0, 236.0, 110.0])
_FIRE_MID_RGB = np.array([255.0, 142.0, 20.0])
_FIRE_TIP_RGB = np.array([222.0, 58.0, 10.0])

_MAX_BLOOD_DROPS = 7
_LOBES_PER_DROP = 2
_SATELLITES_PER_DROP = 3
_MAX_FLAME_TONGUES = 6
_CHUNK = 64


@dataclass(frozen=True)
class Scene:
    """The labelled content of one image (the layout jitter is not part of it)."""

    shape: str
    colour: str
    style: str
    background: str
    overlay: str

    def __post_init__(self) -> None:
        for head, value in asdict(self).items():
            if value not in HEADS[head]:
                raise ValueError(
                    f"{head}={value!r} is not a value of this world; choose one of {HEADS[head]}"
                )

    def labels(self) -> dict[str, int]:
        """Label index per head."""
        return {head: HEADS[head].index(value) for head, value in asdict(self).items()}


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a scene; any attribute passed by name (e.g. ``overlay="blood"``) is held at that value."""
    return sample_scenes(1, rng, **fixed)[0]


def sample_scenes(n: int, rng: np.random.Generator, **fixed: str) -> list[Scene]:
    """Draw ``n`` scenes: uniform attributes, overlays by ``OVERLAY_PROBABILITIES``."""
    unknown = set(fixed) - set(HEADS)
    if unknown:
        raise ValueError(f"unknown scene attribute(s) {sorted(unknown)}; attributes are {list(HEADS)}")
    columns: dict[str, list[str]] = {}
    for head, values in HEADS.items():
        if head == "overlay":
            weights = np.array([OVERLAY_PROBABILITIES[v] for v in values])
            drawn = rng.choice(len(values), size=n, p=weights / weights.sum())
        else:
            drawn = rng.integers(0, len(values), size=n)
        columns[head] = [fixed[head]] * n if head in fixed else [values[i] for i in drawn]
    return [Scene(**{head: columns[head][i] for head in HEADS}) for i in range(n)]


def labels_of(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Integer labels per head, as LongTensors of length ``len(scenes)``."""
    return {
        head: torch.tensor([values.index(getattr(s, head)) for s in scenes], dtype=torch.long)
        for head, values in HEADS.items()
    }


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 array of shape (32, 32, 3)."""
    return render_many([scene], rng)[0]


def render_batch(
    scenes: Sequence[Scene], rng: np.random.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images as a float tensor (B, 3, 32, 32) in [0, 1], and integer labels per head."""
    pixels = render_many(scenes, rng)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    return images, labels_of(scenes)


def sample_batch(
    n: int, rng: np.random.Generator, **fixed: str
) -> tuple[list[Scene], torch.Tensor, dict[str, torch.Tensor]]:
    """Draw ``n`` scenes and render them: (scenes, images, labels)."""
    scenes = sample_scenes(n, rng, **fixed)
    images, labels = render_batch(scenes, rng)
    return scenes, images, labels


def render_many(scenes: Sequence[Scene], rng: np.random.Generator) -> np.ndarray:
    """Images as uint8 array (B, 32, 32, 3). Draws every jitter for the batch from ``rng`` in a fixed order."""
    n = len(scenes)
    if n == 0:
        raise ValueError("render needs at least one scene")
    layout = _sample_layout(n, rng)
    blood = _sample_blood(n, rng)
    fire = _sample_fire(n, rng)
    # Small chunks keep the supersampled canvases in cache; this is several times faster than one pass.
    chunks = [
        _render_chunk(
            scenes[start : start + _CHUNK],
            *(_take(a, slice(start, start + _CHUNK)) for a in (layout, blood, fire)),
        )
        for start in range(0, n, _CHUNK)
    ]
    return np.concatenate(chunks)


def _render_chunk(
    scenes: Sequence[Scene],
    layout: Mapping[str, np.ndarray],
    blood: Mapping[str, np.ndarray],
    fire: Mapping[str, np.ndarray],
) -> np.ndarray:
    n = len(scenes)
    grid_y, grid_x = _grid()
    background = np.array([BACKGROUND_RGB[s.background] for s in scenes], dtype=np.float32)
    colour = np.array([COLOUR_RGB[s.colour] for s in scenes], dtype=np.float32) + layout["colour_jitter"]
    canvas = np.broadcast_to(
        (background + layout["background_jitter"])[:, None, None, :], (n, _CANVAS, _CANVAS, 3)
    ).astype(np.float32)

    shape_mask = np.zeros((n, _CANVAS, _CANVAS), dtype=bool)
    for shape in SHAPES:
        index = _indices(scenes, "shape", shape)
        if index.size:
            u, v = _shape_coordinates(grid_x, grid_y, _take(layout, index))
            shape_mask[index] = _SHAPE_MASKS[shape](u, v)

    ink = np.zeros_like(shape_mask)
    pale = np.zeros_like(shape_mask)
    for style in STYLES:
        index = _indices(scenes, "style", style)
        if index.size:
            ink[index], pale[index] = _style_masks(
                style, shape_mask[index], grid_x, grid_y, _take(layout, index)
            )
    canvas = np.where(ink[..., None], colour[:, None, None, :], canvas)
    canvas = np.where(pale[..., None], (0.38 * colour + 0.62 * 255.0)[:, None, None, :], canvas)

    for overlay, sample, layer in (("blood", blood, _blood_layer), ("fire", fire, _fire_layer)):
        index = _indices(scenes, "overlay", overlay)
        if index.size:
            alpha, tint = layer(_take(sample, index), grid_x, grid_y)
            canvas[index] += alpha[..., None] * (tint - canvas[index])

    small = (
        canvas[:, 0::2, 0::2] + canvas[:, 1::2, 0::2] + canvas[:, 0::2, 1::2] + canvas[:, 1::2, 1::2]
    ) / 4
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _indices(scenes: Sequence[Scene], head: str, value: str) -> np.ndarray:
    return np.array([i for i, s in enumerate(scenes) if getattr(s, head) == value], dtype=np.intp)


def _take(arrays: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: array[index] for key, array in arrays.items()}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres of the supersampled canvas, in output-pixel units, shape (1, 64, 64)."""
    centres = (np.arange(_CANVAS, dtype=np.float32) + 0.5) / SUPERSAMPLE
    grid_y, grid_x = np.meshgrid(centres, centres, indexing="ij")
    return grid_y[None], grid_x[None]


def _sample_layout(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    radius = rng.uniform(8.0, 11.5, size=n)
    # Keep the shape off the bottom rows so fire (which rises from the bottom) never hides most of it.
    centre_x = rng.uniform(radius + 1.0, IMAGE_SIZE - radius - 1.0)
    centre_y = rng.uniform(radius + 1.0, IMAGE_SIZE - radius - 3.0)
    return {
        "centre_x": centre_x,
        "centre_y": centre_y,
        "radius": radius,
        "angle": rng.uniform(-0.2, 0.2, size=n),
        "stripe_period": rng.uniform(4.5, 5.5, size=n),
        "stripe_direction": rng.choice(np.array([-1.0, 1.0]), size=n),
        "checker_cell": rng.uniform(3.5, 4.5, size=n),
        "pattern_phase_x": rng.uniform(0.0, 10.0, size=n),
        "pattern_phase_y": rng.uniform(0.0, 10.0, size=n),
        "sketch_width": rng.integers(3, 5, size=n),  # in supersampled pixels: 1.5 to 2 output pixels
        "colour_jitter": rng.uniform(-10.0, 10.0, size=(n, 3)),
        "background_jitter": rng.uniform(-6.0, 6.0, size=(n, 3)),
    }


def _column(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)[:, None, None]


def _shape_coordinates(
    grid_x: np.ndarray, grid_y: np.ndarray, layout: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates mapped into the shape's unit frame (shape spans about [-1, 1], y down)."""
    dx = (grid_x - _column(layout["centre_x"])) / _column(layout["radius"])
    dy = (grid_y - _column(layout["centre_y"])) / _column(layout["radius"])
    cos, sin = np.cos(_column(layout["angle"])), np.sin(_column(layout["angle"]))
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the angle into one spike's half-sector; inside means below the edge from tip to notch.
    sector = 2 * np.pi / 5
    angle = np.mod(np.arctan2(u, -v), sector)
    angle = np.minimum(angle, sector - angle)
    rho = np.hypot(u, v)
    px, py = rho * np.cos(angle), rho * np.sin(angle)
    tip = np.array([1.2, 0.0])
    notch = 0.5 * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    edge = notch - tip
    return edge[0] * (py - tip[1]) - edge[1] * (px - tip[0]) >= 0


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, -1.15 * v + 0.12
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (v <= 0.75) & (np.abs(u) * 1.75 <= (v + 1.0) * 1.05)


_SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u**2 + v**2 <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
    "triangle": _triangle,
    "star": _star,
    "heart": _heart,
    "cross": lambda u, v: (
        ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.98)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.98))
    ),
    "diamond": lambda u, v: np.abs(u) / 0.72 + np.abs(v) <= 1.0,
    "crescent": lambda u, v: (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.12) ** 2 > 0.78**2),
}


def _erode(mask: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Binary erosion with a diamond element, ``steps[i]`` pixels for image i."""
    eroded = mask.copy()
    for step in range(int(steps.max())):
        shrunk = eroded.copy()
        shrunk[:, 1:, :] &= eroded[:, :-1, :]
        shrunk[:, :-1, :] &= eroded[:, 1:, :]
        shrunk[:, :, 1:] &= eroded[:, :, :-1]
        shrunk[:, :, :-1] &= eroded[:, :, 1:]
        active = steps > step
        eroded[active] = shrunk[active]
    return eroded


def _style_masks(
    style: str, mask: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray, layout: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Split a shape mask into pixels drawn in the full colour (ink) and in its pale tint."""
    if style == "plain":
        return mask, np.zeros_like(mask)
    if style == "sketch":
        return mask & ~_erode(mask, layout["sketch_width"]), np.zeros_like(mask)
    x = grid_x + _column(layout["pattern_phase_x"])
    y = grid_y + _column(layout["pattern_phase_y"])
    if style == "striped":
        bands = (
            np.mod((x * _column(layout["stripe_direction"]) + y) / _column(layout["stripe_period"]), 1.0)
            < 0.5
        )
    else:
        cell = _column(layout["checker_cell"])
        bands = (np.floor(x / cell) + np.floor(y / cell)).astype(np.int64) % 2 == 0
    return mask & bands, mask & ~bands


def _sample_blood(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    drops = (n, _MAX_BLOOD_DROPS)
    lobes = (n, _MAX_BLOOD_DROPS, _LOBES_PER_DROP)
    satellites = (n, _MAX_BLOOD_DROPS, _SATELLITES_PER_DROP)
    return {
        "count": rng.integers(4, _MAX_BLOOD_DROPS + 1, size=n),
        "x": rng.uniform(3.0, IMAGE_SIZE - 3.0, size=drops),
        "y": rng.uniform(3.0, IMAGE_SIZE - 3.0, size=drops),
        "radius": rng.uniform(1.1, 2.2, size=drops),
        "lobe_angle": rng.uniform(0.0, 2 * np.pi, size=lobes),
        "lobe_scale": rng.uniform(0.5, 0.8, size=lobes),
        "drip_length": rng.uniform(1.0, 6.0, size=drops) * (rng.random(size=drops) < 0.5),
        "satellite_angle": rng.uniform(0.0, 2 * np.pi, size=satellites),
        "satellite_distance": rng.uniform(1.6, 3.2, size=satellites),
        "satellite_radius": rng.uniform(0.45, 0.9, size=satellites),
        "shade": rng.uniform(-18.0, 18.0, size=n),
    }


def _blood_layer(
    blood: Mapping[str, np.ndarray], grid_x: np.ndarray, grid_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Irregular dark-red drops (a disc plus off-centre lobes), satellite droplets and drips."""
    n = blood["x"].shape[0]
    x, y, radius = blood["x"][..., None], blood["y"][..., None], blood["radius"][..., None]
    lobe_offset = 0.7 * radius
    satellite_offset = radius * blood["satellite_distance"]
    circle_x = np.concatenate(
        [
            x,
            x + lobe_offset * np.cos(blood["lobe_angle"]),
            x + satellite_offset * np.cos(blood["satellite_angle"]),
        ],
        axis=-1,
    )
    circle_y = np.concatenate(
        [
            y,
            y + lobe_offset * np.sin(blood["lobe_angle"]),
            y + satellite_offset * np.sin(blood["satellite_angle"]),
        ],
        axis=-1,
    )
    circle_radius = np.concatenate([radius, radius * blood["lobe_scale"], blood["satellite_radius"]], axis=-1)
    enabled = np.arange(_MAX_BLOOD_DROPS)[None, :, None] < blood["count"][:, None, None]
    # A negative squared radius switches a circle off without changing array shapes.
    squared_radius = np.where(enabled, circle_radius**2, -1.0).reshape(n, -1).astype(np.float32)

    columns, rows = grid_x[0, 0], grid_y[0, :, 0]
    dx2 = (columns[None, None, :] - circle_x.reshape(n, -1, 1).astype(np.float32)) ** 2
    dy2 = (rows[None, None, :] - circle_y.reshape(n, -1, 1).astype(np.float32)) ** 2
    splat = ((dy2[..., :, None] + dx2[..., None, :]) <= squared_radius[..., None, None]).any(axis=1)

    drip_x = np.abs(columns[None, None, :] - blood["x"][..., None]) <= 0.35 * blood["radius"][..., None]
    below = rows[None, None, :] - blood["y"][..., None]
    drip_length = np.where(enabled[..., 0], blood["radius"] + blood["drip_length"], -1.0)
    drip_y = (below >= 0) & (below <= drip_length[..., None])
    splat |= (drip_y[..., :, None] & drip_x[..., None, :]).any(axis=1)

    colour = (_BLOOD_RGB + blood["shade"][:, None] * np.array([1.0, 0.1, 0.1]))[:, None, None, :]
    return splat.astype(np.float32) * 0.95, colour.astype(np.float32)


def _sample_fire(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tongues = (n, _MAX_FLAME_TONGUES)
    return {
        "base": rng.uniform(2.5, 4.0, size=n),
        "count": rng.integers(4, _MAX_FLAME_TONGUES + 1, size=n),
        "centre": rng.uniform(0.0, IMAGE_SIZE, size=tongues),
        "height": rng.uniform(5.0, 11.0, size=tongues),
        "width": rng.uniform(1.3, 2.6, size=tongues),
        "flicker_phase": rng.uniform(0.0, 2 * np.pi, size=n),
    }


def _fire_layer(
    fire: Mapping[str, np.ndarray], grid_x: np.ndarray, grid_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flame tongues rising from the bottom edge, yellow at the base to red-orange at the tips."""
    x = grid_x[0, 0]  # (W,)
    enabled = np.arange(_MAX_FLAME_TONGUES)[None, :] < fire["count"][:, None]
    bumps = fire["height"][..., None] * np.exp(
        -(((x[None, None, :] - fire["centre"][..., None]) / fire["width"][..., None]) ** 2)
    )
    flicker = 0.8 * np.sin(1.7 * x[None, :] + fire["flicker_phase"][:, None])
    height = fire["base"][:, None] + (bumps * enabled[..., None]).max(axis=1) + flicker  # (B, W)
    depth = IMAGE_SIZE - grid_y[0][None]  # distance from the bottom edge, (1, H, W)
    level = depth / np.maximum(height[:, None, :], 0.5)  # 0 at the bottom, 1 at the flame edge
    inside = level <= 1.0
    t = np.clip(level, 0.0, 1.0)[..., None]
    low = _FIRE_BASE_RGB + (_FIRE_MID_RGB - _FIRE_BASE_RGB) * np.clip(t / 0.55, 0.0, 1.0)
    colour = low + (_FIRE_TIP_RGB - _FIRE_MID_RGB) * np.clip((t - 0.55) / 0.45, 0.0, 1.0)
    alpha = inside * (0.92 - 0.22 * t[..., 0])
    return alpha.astype(np.float32), colour.astype(np.float32)
