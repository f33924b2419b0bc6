"""The HTTP service: @champion answers every request, @shadow is mirrored in the background on bounded,
deadline-aware workers, both answers are logged in the traffic schema; and the offline replay of logged traffic
through the same two models."""
