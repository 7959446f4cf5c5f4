# placeholder: being written (issue 3)
def linear_cross_entropy(*args, **kwargs):
    raise NotImplementedError


def prefix_reconstruction_loss(*args, **kwargs):
    raise NotImplementedError


class LinearCrossEntropyLoss:
    pass
