"""`llmprune recipes [NAME] [--methods]`: list the shipped recipes, print one, or list every stage's keys."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list named recipes, print one as YAML, or list methods and their keys")
    p.add_argument("name", nargs="?", help="print this recipe")
    p.add_argument("--methods", action="store_true", help="every `method:` a stage can name, with its YAML keys")
    p.set_defaults(func=run)


def run(args) -> int:
    from llmprune.recipe import load_recipe, named_recipes

    if args.methods:
        import inspect

        from llmprune.stages import all_methods, kind_for, stage_params

        for method in all_methods():
            kind = kind_for(method)
            print(f"{method}  ({kind.name} stage)")
            for key, p in stage_params(method).items():
                default = "required" if p.default is inspect.Parameter.empty else f"default {p.default!r}"
                print(f"    {key}: {default}")
        return 0
    if args.name:
        print(load_recipe(args.name).to_yaml(), end="")
        return 0
    for name in sorted(named_recipes()):
        recipe = load_recipe(name)
        print(f"{name:20s} {recipe.description}")
    return 0
