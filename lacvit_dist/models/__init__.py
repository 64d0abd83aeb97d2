"""Models: the timm factory and heads, weights from files and hub tags, memory estimate, timm export."""
