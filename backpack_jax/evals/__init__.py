"""The paper's experiments as functions and commands (see docs/experiments.md).

    python -m backpack_jax.evals.similarity  # Table 4: lexical similarity of senses
    python -m backpack_jax.evals.gender      # Table 5, Figure 3: pronoun bias and sense 10
    python -m backpack_jax.evals.topic       # Table 12: topic control by sense weighting
    python -m backpack_jax.evals.edit        # Table 6: knowledge editing
    python -m backpack_jax.evals.harness     # Table 2: lm-evaluation-harness, model `backpack-jax`
    python -m backpack_jax.evals.canonical   # the follow-up (Hewitt et al. 2024): sense finetuning
"""
