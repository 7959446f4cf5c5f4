"""The embedded synthetic retail catalog and behaviour log (the default data: no download)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from .dataset import ConfigError, RecDataset

# ----------------------------------------------------------------------------------------------------------------
# Synthetic retail catalog and behaviour log
# ----------------------------------------------------------------------------------------------------------------
CATEGORIES = ("jacket", "sneaker", "backpack", "watch", "lamp", "mug", "sofa", "headphones", "dress", "tent",
              "blender", "notebook")
BRANDS = ("northpeak", "urbanloom", "solace", "kestrel", "brightwell", "marlowe", "tidewater", "ironbark", "velora",
          "cobalt", "fernhill", "aurelia")
MATERIALS = ("leather", "cotton", "wool", "steel", "ceramic", "bamboo", "nylon", "linen", "oak", "glass")
STYLES = ("vintage", "minimalist", "sporty", "classic", "rugged", "modern", "bohemian", "industrial")
COLOURS = ("black", "white", "red", "navy", "olive", "beige", "grey", "mustard", "teal", "burgundy")
PRICE_BANDS = ("budget", "midrange", "premium", "luxury")
ATTRIBUTE_VOCAB = {"category": CATEGORIES, "brand": BRANDS, "material": MATERIALS, "style": STYLES,
                   "colour": COLOURS, "price": PRICE_BANDS}


@dataclass
class SyntheticConfig:
    num_items: int = 1500
    num_users: int = 800
    sessions_per_user: Tuple[int, int] = (2, 4)   # inclusive range
    clicks_per_session: Tuple[int, int] = (3, 6)  # inclusive range
    impression_size: int = 10                     # items shown per step, the click included
    image_dim: int = 32
    image_noise: float = 0.5
    drift: float = 0.6                            # chance that a new session moves the user's focus
    # Cold start: this fraction of the catalog are new arrivals, shown only at each user's last two steps (the
    # validation and test targets), so they have no training clicks and only their text (and image) describes them.
    new_item_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.num_items, int) or self.num_items < 2:
            raise ConfigError(f"data.num_items must be an integer >= 2, got {self.num_items!r}")
        if not isinstance(self.num_users, int) or self.num_users < 1:
            raise ConfigError(f"data.num_users must be an integer >= 1, got {self.num_users!r}")
        for name in ("sessions_per_user", "clicks_per_session"):
            low_high = tuple(getattr(self, name))
            valid = len(low_high) == 2 and all(isinstance(v, int) for v in low_high)
            if not valid or not 1 <= low_high[0] <= low_high[1]:
                raise ConfigError(f"data.{name} must be two integers 1 <= low <= high, got {getattr(self, name)!r}")
            setattr(self, name, low_high)
        if not isinstance(self.impression_size, int) or not 1 <= self.impression_size <= self.num_items:
            raise ConfigError(f"data.impression_size must be an integer in [1, num_items], "
                              f"got {self.impression_size!r}")
        if not isinstance(self.image_dim, int) or self.image_dim < 1:
            raise ConfigError(f"data.image_dim must be an integer >= 1, got {self.image_dim!r}")
        if not 0.0 <= self.drift <= 1.0:
            raise ConfigError(f"data.drift must be in [0, 1], got {self.drift!r}")
        if not 0.0 <= self.new_item_fraction < 1.0:
            raise ConfigError(f"data.new_item_fraction must be in [0, 1), got {self.new_item_fraction!r}")
        if self.image_noise < 0:
            raise ConfigError(f"data.image_noise must be >= 0, got {self.image_noise!r}")


def item_text(attributes: Dict[str, int]) -> str:
    """Title-like text of a synthetic item: every word carries one latent attribute."""
    word = {name: ATTRIBUTE_VOCAB[name][index] for name, index in attributes.items()}
    return (f"{word['brand']} {word['colour']} {word['material']} {word['style']} {word['category']} , "
            f"{word['price']}")


def generate_synthetic(config: SyntheticConfig = SyntheticConfig()) -> RecDataset:
    """A retail catalog and behaviour log whose clicks follow the items' semantics.

    Items: category, brand (each category stocks a few brands), material (category dependent), style, colour and a
    price band (each brand has a typical band). The image feature is a sum of per-attribute latent vectors for the
    visible attributes plus noise. A ``new_item_fraction`` of the items are new arrivals that only the last two
    steps of each user show (cold items: no training clicks). Users: a lasting taste (colours, price bands,
    brands) and a session focus (category + style) that drifts between sessions. Each step shows
    ``impression_size`` items, half from the focus category and half by popularity (new arrivals of the focus
    category join at the last two steps), and the user clicks the best by taste plus Gumbel noise.
    """
    rng = np.random.default_rng(config.seed)
    n = config.num_items
    n_cat, n_brand, n_mat = len(CATEGORIES), len(BRANDS), len(MATERIALS)
    n_style, n_col, n_price = len(STYLES), len(COLOURS), len(PRICE_BANDS)

    brands_of_category = [rng.choice(n_brand, size=4, replace=False) for _ in range(n_cat)]
    material_probs = rng.dirichlet(np.full(n_mat, 0.4), size=n_cat)
    price_of_brand = rng.integers(0, n_price, size=n_brand)

    category = rng.integers(0, n_cat, size=n)
    brand = np.array([rng.choice(brands_of_category[c]) for c in category])
    material = np.array([rng.choice(n_mat, p=material_probs[c]) for c in category])
    style = rng.integers(0, n_style, size=n)
    colour = rng.integers(0, n_col, size=n)
    price = np.clip(price_of_brand[brand] + rng.integers(-1, 2, size=n), 0, n_price - 1)
    attributes = {"category": category, "brand": brand, "material": material, "style": style, "colour": colour,
                  "price": price}
    texts = [item_text({k: int(v[i]) for k, v in attributes.items()}) for i in range(n)]

    dim = config.image_dim
    visual = {name: rng.normal(size=(len(ATTRIBUTE_VOCAB[name]), dim)) for name in
              ("category", "material", "style", "colour")}
    image = sum(visual[name][attributes[name]] for name in visual)
    image = image + config.image_noise * rng.normal(size=image.shape)
    image = (image - image.mean(0)) / (image.std(0) + 1e-6)

    is_new = np.zeros(n, dtype=bool)
    is_new[rng.choice(n, int(round(config.new_item_fraction * n)), replace=False)] = True
    popularity = (rng.pareto(1.5, size=n) + 1.0) * ~is_new      # new arrivals have no popularity yet
    popularity /= popularity.sum()
    old_of_category = [np.flatnonzero((category == c) & ~is_new) for c in range(n_cat)]
    new_of_category = [np.flatnonzero((category == c) & is_new) for c in range(n_cat)]
    category_weight = np.array([len(ix) for ix in old_of_category], dtype=np.float64) + 1e-9
    category_weight /= category_weight.sum()

    sequences, impressions = [], []
    size = config.impression_size
    for _ in range(config.num_users):
        taste_colour = np.log(rng.dirichlet(np.full(n_col, 0.3)) + 1e-3)
        taste_price = np.log(rng.dirichlet(np.full(n_price, 0.5)) + 1e-3)
        taste_brand = rng.normal(scale=1.0, size=n_brand)
        taste_category = rng.dirichlet(np.full(n_cat, 0.3)) * 0.7 + 0.3 * category_weight
        focus_category = rng.choice(n_cat, p=taste_category)
        focus_style = rng.integers(0, n_style)
        clicks, shown_lists = [], []
        sessions = [int(rng.integers(config.clicks_per_session[0], config.clicks_per_session[1] + 1))
                    for _ in range(rng.integers(config.sessions_per_user[0], config.sessions_per_user[1] + 1))]
        total = sum(sessions)
        for session, session_clicks in enumerate(sessions):
            if session > 0 and rng.random() < config.drift:
                focus_category = rng.choice(n_cat, p=taste_category)
                focus_style = rng.integers(0, n_style)
            for _ in range(session_clicks):
                in_focus = old_of_category[focus_category]
                n_focus = min(len(in_focus), (size + 1) // 2)
                shown = set(rng.choice(in_focus, size=n_focus, replace=False).tolist()) if n_focus else set()
                arrivals = new_of_category[focus_category]
                if len(clicks) >= total - 2 and len(arrivals):   # the last two steps also show new arrivals
                    n_new = min(len(arrivals), (n_focus + 1) // 2, size - n_focus)
                    shown.update(rng.choice(arrivals, size=n_new, replace=False).tolist())
                while len(shown) < size:
                    shown.add(int(rng.choice(n, p=popularity)))
                shown = np.fromiter(shown, dtype=np.int64)
                utility = (2.0 * (category[shown] == focus_category) + 1.5 * (style[shown] == focus_style)
                           + taste_colour[colour[shown]] + taste_price[price[shown]] + taste_brand[brand[shown]]
                           + rng.gumbel(size=len(shown)))
                clicked = int(shown[np.argmax(utility)])
                clicks.append(clicked)
                shown_lists.append(tuple(int(i) for i in shown if i != clicked))
        sequences.append(clicks)
        impressions.append(shown_lists)
    return RecDataset(name="synthetic", item_texts=texts, sequences=sequences, impressions=impressions,
                      image_features=image.astype(np.float32), item_attributes=attributes)
