"""A small synthetic world where dreamfuse's methods can be measured: seeded scenes of shapes, their captions, and a
pixel-rule reader that reads the attributes back from an image.

Nothing can be downloaded where dreamfuse is developed, so a model trained on real photographs is out of reach; this
world is small enough to train an SD-layout model on two CPU cores and real enough that each method's effect is
measurable against the generator's ground truth (what DINO/CLIP scores approximate on photographs).

Scenes. A 64x64 image holds one or two objects on a background. An object has a ``shape`` (:data:`SHAPES`), a
``colour`` (:data:`COLOURS`), a ``texture`` (:data:`TEXTURES`: plain, or a darker shade of the colour in stripes, dots
or checks), a ``size`` (:data:`SIZES`) and a centre. Two objects stand in a spatial relation (:data:`RELATIONS`:
above, below, left of, right of, inside, beside), always with different colours. Backgrounds (:data:`BACKGROUNDS`)
are bright with a faint seeded grain, so that every colour, its shade and the background are far apart in RGB.

Captions come from a small grammar::

    one object:   a [small|large] [striped|dotted|checked] <colour> <shape> [on the left|...|in the middle] on <bg>
    two objects:  <object> <relation> <object> on <bg>

with the optional words dropped at random (the position in half the one-object captions, the size word in half),
so that a model trained on them also follows prompts that leave things unsaid.

Reading (:func:`read_image`). Every pixel is classified to the nearest of the background colours and the object
colours (each the segment from its shade to it, so that blends of the two tones keep their colour); connected
pixels of one colour form an object; its ``shape`` is the one whose template, fitted to the object's bounding box
(holes filled), overlaps it best; its ``texture`` follows from the fraction and the run pattern of shade pixels
(stripes change down a column only; checks shade every row and column, dots leave some clear); its position is its
centroid. :func:`score` compares a reading with
a scene's ground truth attribute by attribute. On the generator's own images it reads more than 99 % of shapes,
positions and relations and about 98 % of textures right (tested; dots and checks on small stars are the misses);
on generated images its accuracy is what the model's evaluation states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHADE = 0.4  # a texture's second colour: the object's colour times this (every shade is dark, every background bright)
TEXTURES = ("plain", "striped", "dotted", "checked")
SIZES = {"small": 0.22, "large": 0.42}  # diameter as a fraction of the image side
BACKGROUNDS = {"grass": (90, 170, 80), "sand": (222, 198, 150), "sky": (140, 195, 240)}
RELATIONS = ("above", "below", "left of", "right of", "inside", "beside")
CONTAINERS = ("circle", "square")  # the shapes an "inside" scene puts the small object in
POSITIONS = {  # one-object position words -> centre (x, y) as fractions of the side
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
SIZE = 64
GRAIN = 6.0  # the background's grain: standard deviation in 0..255 units
_SUPER = 4  # supersampling factor of the rasterizer (anti-aliased edges)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: attributes and centre (fractions of the image side, y downwards)."""

    shape: str
    colour: str
    texture: str
    size: str
    cx: float
    cy: float

    def words(self, with_size: bool = True) -> str:
        parts = ["a"]
        if with_size:
            parts.append(self.size)
        if self.texture != "plain":
            parts.append(self.texture)
        parts += [self.colour, self.shape]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]
    position: str | None = None  # the one-object position word, when the scene was placed by one
    caption: str = ""
    seed: int = 0


# --------------------------------------------------------------------------------------------- sampling
def _check_choice(field: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(map(str, allowed))}")


def sample_object(rng: np.random.Generator, *, shape=None, colour=None, texture=None, size=None,
                  exclude_colours: Sequence[str] = ()) -> Obj:
    """An object with the given attributes and the rest drawn from ``rng`` (centre 0.5, 0.5; placed later)."""
    _check_choice("shape", shape, SHAPES)
    _check_choice("colour", colour, COLOURS)
    _check_choice("texture", texture, TEXTURES)
    _check_choice("size", size, SIZES)
    colours = [c for c in COLOURS if c not in exclude_colours]
    return Obj(shape=shape or SHAPES[rng.integers(len(SHAPES))],
               colour=colour or colours[rng.integers(len(colours))],
               texture=texture or TEXTURES[rng.integers(len(TEXTURES))],
               size=size or tuple(SIZES)[rng.integers(len(SIZES))], cx=0.5, cy=0.5)


def _radius(o: Obj) -> float:
    return SIZES[o.size] / 2


def _place_pair(rng: np.random.Generator, a: Obj, b: Obj, relation: str) -> tuple[Obj, Obj]:
    """Centres for ``a <relation> b``, both inside the frame with a margin."""
    if relation == "inside":  # a small object in a large circle or square (a star's arms would cut it)
        shape = b.shape if b.shape in CONTAINERS else CONTAINERS[int(rng.integers(len(CONTAINERS)))]
        a, b = dataclasses.replace(a, size="small"), dataclasses.replace(b, size="large", shape=shape)
        c = rng.uniform(0.3, 0.7, size=2)
        return dataclasses.replace(a, cx=c[0], cy=c[1]), dataclasses.replace(b, cx=c[0], cy=c[1])
    if relation == "beside":
        relation = "left of" if rng.random() < 0.5 else "right of"
    a_first = relation in ("above", "left of")  # a has the smaller coordinate along the relation's axis
    rf, rs = (_radius(a), _radius(b)) if a_first else (_radius(b), _radius(a))
    gap = rng.uniform(0.04, 0.1)
    span = rf + rs + gap  # centre distance along the relation's axis
    lo_along, hi_along = rf + 0.03, 1 - rs - 0.03 - span
    first = rng.uniform(lo_along, hi_along) if hi_along > lo_along else (1 - span + rf - rs) / 2
    second = first + span
    lo, hi = max(rf, rs) + 0.03, 1 - max(rf, rs) - 0.03
    across = float(rng.uniform(lo, hi))
    ca, cb = (first, second) if a_first else (second, first)
    if relation in ("above", "below"):
        return dataclasses.replace(a, cx=across, cy=ca), dataclasses.replace(b, cx=across, cy=cb)
    return dataclasses.replace(a, cx=ca, cy=across), dataclasses.replace(b, cx=cb, cy=across)


def sample_scene(seed: int, *, n_objects: int | None = None, relation: str | None = None,
                 background: str | None = None, objects: Sequence[dict] | None = None,
                 position: str | None = None, caption_dropout: bool = True) -> Scene:
    """One seeded scene. Unspecified fields are drawn from ``seed``; ``objects`` fixes attributes per object
    (e.g. ``[{"shape": "star", "texture": "dotted"}]``), ``position`` places a single object by a position word."""
    if n_objects is not None and n_objects not in (1, 2):
        raise ValueError(f"n_objects: {n_objects!r} (a scene holds 1 or 2 objects)")
    _check_choice("relation", relation, RELATIONS)
    _check_choice("background", background, BACKGROUNDS)
    _check_choice("position", position, POSITIONS)
    rng = np.random.default_rng(seed)
    fixed = [dict(o) for o in (objects or ())]
    n = n_objects or (len(fixed) if fixed else (2 if relation else int(rng.integers(1, 3))))
    if fixed and len(fixed) != n:
        raise ValueError(f"objects: {len(fixed)} given for a scene of {n}")
    if relation is not None and n != 2:
        raise ValueError("relation: needs a scene of two objects")
    if position is not None and n != 1:
        raise ValueError("position: places a scene of one object")
    fixed += [{}] * (n - len(fixed))
    bg = background or tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    first = sample_object(rng, **fixed[0])
    drop_size = caption_dropout and rng.random() < 0.5
    if n == 1:
        word = position
        if word is None:
            if caption_dropout and rng.random() < 0.5:
                word = None  # anywhere; the caption says nothing about where
                r = _radius(first)
                c = rng.uniform(r + 0.03, 1 - r - 0.03, size=2)
            else:
                word = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        if word is not None:
            c = np.array(POSITIONS[word]) + rng.uniform(-0.05, 0.05, size=2)
        first = dataclasses.replace(first, cx=float(c[0]), cy=float(c[1]))
        where = f" {word}" if word else ""
        cap = f"{first.words(not drop_size)}{where} on {bg}"
        return Scene(bg, (first,), None, word, cap, seed)
    rel = relation or RELATIONS[rng.integers(len(RELATIONS))]
    second = sample_object(rng, **{**fixed[1], "exclude_colours": (first.colour,)})
    if second.colour == first.colour:
        raise ValueError("objects: the two objects of a scene need different colours")
    a, b = _place_pair(rng, first, second, rel)
    cap = f"{a.words(not drop_size)} {rel} {b.words(not drop_size)} on {bg}"
    return Scene(bg, (a, b), rel, None, cap, seed)


def sample_scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    """``n`` scenes from one seed (scene i from a seed derived from ``seed`` and i)."""
    seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)
    return [sample_scene(int(s), **kwargs) for s in seeds]


# --------------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        # an equilateral triangle inscribed in r, lowered so that its bounding box is centred on (cx, cy)
        return [(cx + r * np.cos(a), cy + r * np.sin(a) + r / 4) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = np.deg2rad(-90 + 36 * k)
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a) + r * 0.095))
        return pts
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return None


def coverage(o: Obj, size: int = SIZE) -> np.ndarray:
    """The object's anti-aliased coverage in [0, 1], ``(size, size)`` float32."""
    return _coverage_at(o, _radius(o), (size, size))


def _coverage_at(o: Obj, radius: float, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = hw
    img = Image.new("L", (w * _SUPER, h * _SUPER), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = o.cx * w * _SUPER, o.cy * h * _SUPER, radius * w * _SUPER
    poly = _polygon(o.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def texture_mask(texture: str, size: int = SIZE, centre: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """1 where a texture shows its shade, ``(size, size)`` float32. The pattern is anchored at the object's
    ``centre`` (fractions of the side; a dot or a shaded check sits on it) and its periods scale with the side."""
    if texture not in TEXTURES:
        raise ValueError(f"texture: {texture!r} is not one of {', '.join(TEXTURES)}")
    s = size * _SUPER
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s * SIZE  # in 64-pixel units
    yy, xx = yy - centre[1] * SIZE, xx - centre[0] * SIZE
    if texture == "plain":
        m = np.zeros((s, s), np.float32)
    elif texture == "striped":
        m = (((yy + 2) // 4) % 2 == 0).astype(np.float32)  # horizontal bands 4 px wide, one through the centre
    elif texture == "checked":
        m = ((((yy + 2) // 4) + ((xx + 2) // 4)) % 2 == 0).astype(np.float32)
    else:  # dotted: discs of radius 2 px on a 7 px grid
        dy, dx = ((yy + 3.5) % 7) - 3.5, ((xx + 3.5) % 7) - 3.5
        m = (dx * dx + dy * dy <= 2.0 ** 2).astype(np.float32)
    return m.reshape(size, _SUPER, size, _SUPER).mean(axis=(1, 3))


def render(scene: Scene, size: int = SIZE, *, return_masks: bool = False):
    """The scene as ``uint8 (size, size, 3)``; with ``return_masks`` also each object's visible coverage
    ``(n, size, size)`` float32 (an inner object occludes the one it is inside)."""
    rng = np.random.default_rng(np.random.SeedSequence([scene.seed, 0x5EED]))
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    img += rng.normal(0, GRAIN, size=(size, size, 1))
    # draw the larger object first (an inner object lies on top of the one it is inside)
    order = sorted(range(len(scene.objects)), key=lambda i: -SIZES[scene.objects[i].size])
    visible = np.zeros((len(scene.objects), size, size), np.float32)
    for i in order:
        o = scene.objects[i]
        cov = coverage(o, size)
        # anchored on the pixel nearest the centre: the pattern's edges fall between pixels
        anchor = (round(o.cx * size) / size, round(o.cy * size) / size)
        shade = texture_mask(o.texture, size, anchor)
        base = np.asarray(COLOURS[o.colour], np.float32)
        colour = base * (1 - shade[..., None]) + base * SHADE * shade[..., None]
        img = img * (1 - cov[..., None]) + colour * cov[..., None]
        visible *= 1 - cov
        visible[i] = cov
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return (out, visible) if return_masks else out


# --------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class ReadObj:
    shape: str
    colour: str
    texture: str
    cx: float
    cy: float
    area: float  # fraction of the image
    iou: float  # overlap of the object with its shape's template fitted to its bounding box
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[ReadObj, ...]

    def find(self, colour: str) -> ReadObj | None:
        """The largest object of that colour, if any."""
        hits = [o for o in self.objects if o.colour == colour]
        return max(hits, key=lambda o: o.area) if hits else None


_BG = np.array([BACKGROUNDS[b] for b in BACKGROUNDS], np.float32)
_BASE = np.array([COLOURS[c] for c in COLOURS], np.float32)


def _classify(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the nearest class (backgrounds first, then one class per object colour) and, for object
    colours, whether the pixel lies nearer the shade than the colour. An object colour's class is the segment from
    its shade to it, so that blends of a texture's two tones (a generated image has many) stay that colour."""
    d_bg = ((arr[:, :, None, :] - _BG) ** 2).sum(-1)  # (H, W, nb)
    shade = _BASE * SHADE
    seg = _BASE - shade  # (nc, 3)
    t = (((arr[:, :, None, :] - shade) * seg).sum(-1) / (seg * seg).sum(-1)).clip(0, 1)  # (H, W, nc)
    near = shade + t[..., None] * seg
    d_obj = ((arr[:, :, None, :] - near) ** 2).sum(-1)
    cls = np.concatenate([d_bg, d_obj], axis=-1).argmin(-1)
    t_at = np.take_along_axis(t, np.clip(cls - len(BACKGROUNDS), 0, None)[..., None], -1)[..., 0]
    return cls, t_at < 0.5


def label_pixels(image) -> np.ndarray:
    """Per pixel of an RGB image (as :func:`read_image` takes), the name of its nearest class: a background or an
    object colour (a texture's shade counts as its colour). ``(H, W)`` array of str."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr.astype(np.float32) * (255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else 1.0)
    return np.array(tuple(BACKGROUNDS) + tuple(COLOURS))[_classify(arr)[0]]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, each as a boolean image (largest first)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    comps = [labels == i for i in range(1, n + 1)]
    return sorted(comps, key=lambda c: -int(c.sum()))


def _texture_of(comp: np.ndarray, shade: np.ndarray) -> str:
    inner = comp.copy()  # erode by one pixel: anti-aliased edges mix colour and background
    inner[1:] &= comp[:-1]
    inner[:-1] &= comp[1:]
    inner[:, 1:] &= comp[:, :-1]
    inner[:, :-1] &= comp[:, 1:]
    if inner.sum() < 12:
        inner = comp
    frac = float(shade[inner].mean())
    if frac < 0.05:
        return "plain"
    # run pattern: horizontal stripes change down a column but not along a row; checks change along both
    both_v = inner[1:] & inner[:-1]
    both_h = inner[:, 1:] & inner[:, :-1]
    dv = float((shade[1:] != shade[:-1])[both_v].mean()) if both_v.any() else 0.0
    dh = float((shade[:, 1:] != shade[:, :-1])[both_h].mean()) if both_h.any() else 0.0
    if dv > 2.5 * dh + 0.02:
        return "striped"
    # checks shade half the object and put shade in (nearly) every row and column; dots shade a quarter and leave
    # the rows and columns between them clear (on a small star a centre dot covers most of it: the hard case)
    rows, cols = inner.sum(1) >= 3, inner.sum(0) >= 3
    row_cov = float((shade & inner).any(1)[rows].mean()) if rows.any() else 0.0
    col_cov = float((shade & inner).any(0)[cols].mean()) if cols.any() else 0.0
    return "checked" if frac > 0.42 and min(row_cov, col_cov) > 0.6 else "dotted"


def _fill_holes(comp: np.ndarray) -> np.ndarray:
    """The component with every region it encloses (e.g. an object inside it) filled in."""
    outside = ~comp
    reach = np.zeros_like(comp)
    h, w = comp.shape
    border = np.zeros_like(comp)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    stack = list(zip(*np.nonzero(outside & border)))
    for y, x in stack:
        reach[y, x] = True
    while stack:
        y, x = stack.pop()
        for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= yy < h and 0 <= xx < w and outside[yy, xx] and not reach[yy, xx]:
                reach[yy, xx] = True
                stack.append((yy, xx))
    return ~reach


# bounding box of each shape in units of its radius (width, height), as _polygon draws them
_BOX = {"circle": (2.0, 2.0), "square": (1.64, 1.64), "triangle": (np.sqrt(3), 1.5),
        "star": (2 * np.cos(np.deg2rad(18)), 1 + np.cos(np.deg2rad(36)))}


def _shape_of(solid: np.ndarray) -> tuple[str, float]:
    """The shape whose template, fitted to the component's bounding box, overlaps it best (IoU), and that IoU."""
    h, w = solid.shape
    ys, xs = np.nonzero(solid)
    bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    best = ("circle", -1.0)
    for shape, (fw, fh) in _BOX.items():
        r = (bw / w / fw + bh / h / fh) / 2  # the radius that gives this bounding box, averaged over both sides
        tmpl = _coverage_at(Obj(shape, "red", "plain", "small", cx, cy), r, (h, w)) > 0.5
        iou = float((tmpl & solid).sum()) / max(1, int((tmpl | solid).sum()))
        if iou > best[1]:
            best = (shape, iou)
    return best


def read_image(image, *, min_area: float = 0.01) -> Reading:
    """Read background and objects from an RGB image (``uint8 (H, W, 3)``, a PIL image, or float in [0, 1])."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr.astype(np.float32) * (255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else 1.0)
    h, w, _ = arr.shape
    cls, is_shade = _classify(arr)
    nb = len(BACKGROUNDS)
    bg_votes = np.bincount(cls[cls < nb].ravel(), minlength=nb)
    background = tuple(BACKGROUNDS)[int(bg_votes.argmax())]
    objects = []
    for ci, colour in enumerate(COLOURS):
        mine = cls == nb + ci
        shade = mine & is_shade
        for comp in _components(mine):
            area = float(comp.mean())
            if area < min_area:
                break  # sorted: the rest are smaller
            solid = _fill_holes(comp)
            shape, iou = _shape_of(solid)
            ys, xs = np.nonzero(solid)
            objects.append(ReadObj(shape=shape, colour=colour, texture=_texture_of(comp, shade),
                                   cx=float(xs.mean() + 0.5) / w, cy=float(ys.mean() + 0.5) / h, area=area,
                                   iou=iou, mask=solid))
    objects.sort(key=lambda o: -o.area)
    return Reading(background, tuple(objects))


def relation_between(a: ReadObj, b: ReadObj) -> str:
    """The relation word of ``a`` to ``b`` from their masks and centroids ("inside" when a's pixels lie in b's
    bounding box and a is the smaller; otherwise the dominant axis of the centre offset)."""
    ys, xs = np.nonzero(b.mask)
    yy, xx = np.nonzero(a.mask)
    if a.area < b.area and yy.min() >= ys.min() and yy.max() <= ys.max() and xx.min() >= xs.min() \
            and xx.max() <= xs.max():
        return "inside"
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def position_of(o: ReadObj | Obj) -> str:
    """The nearest one-object position word of a centre."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - o.cx) ** 2 + (POSITIONS[p][1] - o.cy) ** 2)


def _relation_holds(expected: str, read: str) -> bool:
    return read == expected or (expected == "beside" and read in ("left of", "right of"))


def score(scene: Scene, reading: Reading) -> dict[str, bool]:
    """Attribute-by-attribute agreement of a reading with the scene's ground truth: ``background``; for each object
    i (found by its colour) ``found_i``, ``shape_i``, ``texture_i``; ``position`` (one object placed by a word) or
    ``relation`` (two objects)."""
    out = {"background": reading.background == scene.background}
    found = []
    for i, o in enumerate(scene.objects):
        r = reading.find(o.colour)
        found.append(r)
        out[f"found_{i}"] = r is not None
        out[f"shape_{i}"] = r is not None and r.shape == o.shape
        out[f"texture_{i}"] = r is not None and r.texture == o.texture
    if scene.position is not None:
        out["position"] = found[0] is not None and position_of(found[0]) == scene.position
    if scene.relation is not None:
        out["relation"] = all(f is not None for f in found) and _relation_holds(
            scene.relation, relation_between(found[0], found[1]))
    return out
