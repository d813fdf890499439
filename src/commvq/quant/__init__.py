"""Pure CommVQ math (imports torch only): commutative codebooks, residual coding, EM, E2E."""
