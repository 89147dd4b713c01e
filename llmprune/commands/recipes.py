"""`llmprune recipes [NAME]`: list the shipped recipes, or print one."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list named recipes, or print one as YAML")
    p.add_argument("name", nargs="?", help="print this recipe")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmprune.recipe import load_recipe, named_recipes

    if args.name:
        print(load_recipe(args.name).to_yaml(), end="")
        return 0
    for name in sorted(named_recipes()):
        recipe = load_recipe(name)
        print(f"{name:20s} {recipe.description}")
    return 0
