"""From bytes to the pixels the model sees: decode (EXIF, alpha, 16-bit, bombs refused), header probes, the whole-image
resize to a bucket (never a crop) and the recipe that names all of it (`Recipe`, recorded in every cache).

Knows sources (to read a member's bytes), nothing of the cache or of the model.
"""
