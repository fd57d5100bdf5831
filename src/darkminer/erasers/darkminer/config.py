"""Every choice of Dark Miner as a named config value. Defaults are justified in docs/darkminer.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from darkminer.config import check_choice, check_non_negative, check_positive, check_sampling_steps
from darkminer.erasers.base import EraserConfig
from darkminer.errors import ConfigError
from darkminer.models.adapters import LoraConfig
from darkminer.models.image_encoders import SET_IMAGE_ENCODER

SPACES = ("token", "condition")
INITS = ("concept", "random", "previous")


@dataclass
class DarkMinerConfig(EraserConfig):
    # Concept image pool: drawn once by the original model from the concept's prompts.
    pool_size: int = 64
    k: int = 8  # pool images per mining/circumventing batch and per verification
    # Mining
    space: str = "token"  # "token": learnable input tokens through the frozen encoder; "condition": its output
    n_tokens: int = 4
    init: str = "previous"  # the first round starts from the concept word whatever this says, unless "random"
    mining_steps: int = 60
    mining_lr: float = 0.01
    # Mine the tokens inside each pool image's own prompt (slots after its first token), as UnlearnDiffAtk
    # attacks: a few tokens added to a concept prompt. Verified and circumvented in the first k pool
    # prompts. False mines them alone, the paper's description (docs/darkminer.md, "Mining" and "Against the white-box attacks: heart").
    mine_in_context: bool = False
    # Erase rows whose condition comes from a concept prompt (round 0's prompts; with mine_in_context every
    # round's rows) map to that prompt's anchor twin, "a checked emerald square" for "a checked emerald heart",
    # instead of the bare anchor, so the rest of the prompt keeps its colour and style. Mined tokens alone
    # still map to the bare anchor. (docs/darkminer.md, "The anchor in context".)
    contextual_anchor: bool = False
    # Verifying
    verify: bool = True
    tau: float = 0.1
    verify_contrast: bool = False  # subtract the score against the preservation pool (verifying.py)
    verify_steps: int = 20
    image_encoder: str | None = None  # None: the testbed encoder on the testbed; a CLIP folder/hub id on SD
    # Circumventing
    lora: LoraConfig = field(default_factory=LoraConfig)
    circumvent_steps: int = 80
    circumvent_lr: float = 1e-3
    # 12 with erase_guidance 1: every gate met on five of the six testbed concepts, where weight 4 without
    # guidance left heart and sketch drawn (direct 0.14-0.15) and weight 8 lost 3.6-4.8 points of preservation
    # on fire and striped (docs/darkminer.md, "Preservation weight 12"; the table in "Defaults").
    preserve_weight: float = 12.0
    # 64, with heart's anchor the square: every gate on all six testbed concepts, two eraser seeds each; at 32
    # heart seed 1 lost 4.4 points and striped 3.0-3.7 (docs/darkminer.md, "Heart's anchor" and "Two eraser
    # seeds on every concept"; the table in "Defaults").
    preserve_pool_size: int = 64
    # Share of the erase rows whose x_t comes from the adapted model's own DDIM trajectories (k of them,
    # sampled once per round under conditions from the round's bank) instead of noised concept-pool images;
    # ESD draws its x_t by such partial sampling, afresh every iteration.
    trajectory_share: float = 0.0
    # Weight of an extra erase term on k rows from those trajectories, on top of the k pool rows (which
    # trajectory_share replaces instead); 0 means no such term.
    trajectory_weight: float = 0.0
    # ESD-style negative guidance on the erase target: eps0(c0) - erase_guidance * (eps0(c) - eps0(c0)), so
    # the student is pushed past the anchor, away from what the original draws for c; 0 is the paper's
    # target (the anchor's prediction alone). 1.0 (with preserve_weight 12): heart's and sketch's direct
    # rates 0.14-0.15 -> 0.045-0.05 (docs/darkminer.md, "Preservation weight 12"; the table in "Defaults").
    erase_guidance: float = 1.0
    concept_word_first_round: bool = True
    # How many of the concept's prompts (target.prompts, the erasure split on the testbed; on SD the --prompts
    # CSV's, the word itself not counted) join its word in round 0 and in the replay set.
    concept_prompts: int = 8
    # Circumvent every earlier verified embedding (and round 0's concept words) again in each round, so a
    # later round cannot undo an earlier one; half of each batch replays them. docs/darkminer.md measures it.
    replay: bool = True
    # Loop
    rounds: int = 8
    patience: int = 2  # stop after this many consecutive failed verifications
    guidance_scale: float | None = None  # sampling guidance for pools and verification (None: model default)
    pool_steps: int | None = None  # DDIM steps for the pools (None: model default)

    def check_model(self, model: str) -> None:
        if self.verify and self.image_encoder is None and model != "testbed":
            raise ConfigError(
                f"Dark Miner's verifier needs a CLIP image encoder on {model!r}: {SET_IMAGE_ENCODER}"
            )

    def validate(self) -> None:
        check_positive(self, pool_size=self.pool_size, k=self.k, n_tokens=self.n_tokens, mining_steps=self.mining_steps,
                       mining_lr=self.mining_lr, circumvent_steps=self.circumvent_steps,
                       circumvent_lr=self.circumvent_lr, rounds=self.rounds, patience=self.patience,
                       preserve_pool_size=self.preserve_pool_size)
        check_non_negative(self, concept_prompts=self.concept_prompts, preserve_weight=self.preserve_weight, trajectory_weight=self.trajectory_weight,
                           erase_guidance=self.erase_guidance)
        check_sampling_steps(self, pool_steps=self.pool_steps, verify_steps=self.verify_steps)
        if self.guidance_scale is not None:
            check_positive(self, guidance_scale=self.guidance_scale)
        if not 0.0 <= self.trajectory_share <= 1.0:
            raise ConfigError(f"DarkMinerConfig.trajectory_share must lie in [0, 1], not {self.trajectory_share}")
        check_choice(self, "space", self.space, SPACES)
        check_choice(self, "init", self.init, INITS)
        if self.mine_in_context and self.space != "token":
            raise ConfigError("DarkMinerConfig.mine_in_context inserts tokens into prompts; it needs space: token")
        if self.k > self.pool_size:
            raise ConfigError(f"DarkMinerConfig.k ({self.k}) cannot exceed pool_size ({self.pool_size})")
        if self.verify_contrast and not self.verify:
            raise ConfigError("DarkMinerConfig.verify_contrast needs verify: true (it changes the verifier's score)")
        if (self.verify_contrast or self.preserve_weight > 0) and self.k > self.preserve_pool_size:
            raise ConfigError(f"DarkMinerConfig.k ({self.k}) exceeds preserve_pool_size ({self.preserve_pool_size}): each "
                              "circumventing step (and a contrast verification) takes k preservation images; "
                              "raise preserve_pool_size to at least k, or lower k")
        # The score is a mean cosine, or with verify_contrast a difference of two. The ends of that range
        # pass every round or none (a verifier that only logs, or a test's); beyond them tau means nothing.
        bound = 2.0 if self.verify_contrast else 1.0
        if not -bound <= self.tau <= bound:
            raise ConfigError(f"DarkMinerConfig.tau must lie in [{-bound:g}, {bound:g}] (the verifier's score is "
                              f"{'a difference of two mean cosines' if self.verify_contrast else 'a mean cosine'}), got {self.tau}")
