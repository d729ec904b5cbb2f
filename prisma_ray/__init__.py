"""prisma-ray: mechanistic interpretability of vision and video transformers on Ray."""
