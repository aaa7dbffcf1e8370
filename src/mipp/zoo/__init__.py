"""What mipp brings besides pruning: a model zoo, datasets from local files, one training
loop, training configs and checkpoints. The pruning library (:func:`mipp.prune`) works on any
``nn.Module``; nothing under :mod:`mipp.methods` or :mod:`mipp.surgery` needs the zoo's
models.

- :mod:`~mipp.zoo.models`: MLP, LeNet-5, VGG-11/13/16/19, CIFAR ResNets, ResNet-18/34/50;
- :mod:`~mipp.zoo.data`: Fashion-MNIST, MNIST, CIFAR-10/100, digits, synthetic tasks;
- :mod:`~mipp.zoo.training`: :func:`~mipp.zoo.training.train`,
  :func:`~mipp.zoo.training.evaluate`, :func:`~mipp.zoo.training.seeded`;
- :mod:`~mipp.zoo.config`: :class:`~mipp.zoo.config.TrainConfig`;
- :mod:`~mipp.zoo.checkpoint`: safetensors checkpoints with a JSON sidecar.
"""
