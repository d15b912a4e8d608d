"""``manage.py semantic_promote demo.Article.embedding [--force | --rollback]``: switch a field's searches to its next slot, or back."""

from semantic import switching
from semantic.management.commands._shared import ONE_FIELD_HELP, SemanticCommand, field_label, resolve_one_field, switch_errors


class Command(SemanticCommand):
    help = (
        "Make every search of an embedding field use its next slot (semantic_prepare) and that slot's model, in "
        "one statement: refused while rows of the next slot are pending, unless --force. --rollback makes the "
        "declared slot answer again; both slots stay filled while the switch exists."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("label", help=ONE_FIELD_HELP)
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--force", action="store_true", help="Promote with rows still pending (they are left out of searches until filled).")
        action.add_argument("--rollback", action="store_true", help="Make the declared slot answer searches again.")
        action.add_argument(
            "--finish",
            action="store_true",
            help="End a promoted switch once the field declares the promoted model (model=) and its own columns "
            "are refilled with it: they answer again, and the next slot is dropped.",
        )

    def run(self, *, label, force, rollback, finish, database, **options):
        field = resolve_one_field(label)
        name = field_label(field)
        if finish:
            counts = switch_errors(lambda: switching.finish(field, database))
            self.stdout.write(
                f"Finished: searches of {name} use its own columns ({field.model_alias!r}, {counts['fresh']:,} rows fresh); "
                f"the next slot is dropped."
            )
            return
        if rollback:
            switch_errors(lambda: switching.rollback(field, database))
            self.stdout.write(f"Rolled back: searches of {name} use {field.model_alias!r} again (the declared slot).")
            return
        counts = switch_errors(lambda: switching.promote(field, database, force=force))
        slot = switching.next_slot(field, database)
        self.stdout.write(
            f"Promoted: searches of {name} use {slot.alias!r} ({slot.dimensions} dimensions), "
            f"{counts['fresh']:,} of {counts['with_text']:,} rows with text fresh in it"
            + (f", {counts['pending']:,} still pending." if counts["pending"] else ".")
            + f" Undo: manage.py semantic_promote {name} --rollback"
        )
