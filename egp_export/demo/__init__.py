"""The built-in demo: the digits ResNet and the train, prune, compile, export and profile run."""
