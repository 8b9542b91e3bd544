"""The paper's experiments: 4-step alternating training and the one-factor ablation grid."""
