"""Recipes that build the project's testbed, outside the installed package (run them from a clone of the
repository: ``python -m recipes.testbed.train``)."""
