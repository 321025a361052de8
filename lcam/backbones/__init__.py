"""Backbones: the frozen classifier split into features and head. :mod:`.base` (the
:class:`Backbone` and its preprocessing, weights), :mod:`.registry` (names -> builders),
:mod:`.specs` (``timm:``/``torchvision:`` specs), :mod:`.split` (cutting any model at a
layer) and :mod:`.vit` (ViT tokens as a feature map). Nothing is imported here.
"""
