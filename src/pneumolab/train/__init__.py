"""Training: the loop, its callbacks, losses and class weights, and the feature-cache fast path."""
