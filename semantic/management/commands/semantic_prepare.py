"""``manage.py semantic_prepare demo.Article.embedding --model finetuned``: start switching a field to another model."""

import sys

from tqdm import tqdm

from semantic import switching
from semantic.management.commands._shared import ONE_FIELD_HELP, SemanticCommand, field_label, resolve_one_field, switch_errors
from semantic.worker import embed_stale_rows


class Command(SemanticCommand):
    help = (
        "Start switching an embedding field to another model alias of SEMANTIC['MODELS'] (its dimensions may "
        "differ): adds the next slot (columns beside the field's, a chunk table, HNSW indexes) and wakes the "
        "workers, which fill it while every search keeps using the live vectors. Follow with semantic_status, "
        "compare with semantic_evaluate --compare-next, switch with semantic_promote. --cancel drops the slot."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("label", help=ONE_FIELD_HELP)
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument("--model", dest="alias", help="The alias in SEMANTIC['MODELS'] to switch to.")
        action.add_argument("--cancel", action="store_true", help="Drop the next slot and the switch (refused once promoted).")
        parser.add_argument(
            "--fill",
            action="store_true",
            help="Fill the next slot here, now, with a progress bar, instead of leaving it to the Celery workers.",
        )
        parser.add_argument("--no-progress", action="store_true", help="No progress bar (it is drawn on stderr).")

    def run(self, *, label, alias, cancel, fill, database, **options):
        field = resolve_one_field(label)
        name = field_label(field)
        if cancel:
            switch_errors(lambda: switching.cancel(field, database))
            self.stdout.write(f"Cancelled the switch of {name}: its next slot is dropped; searches never left the declared one.")
            return
        slot = switch_errors(lambda: switching.prepare(field, alias, database))
        where = f"columns {slot.column_name('vector')}*" + (f", chunk table {slot.chunk_table}" if slot.chunked else "")
        self.stdout.write(
            f"Prepared the switch of {name} from {field.model_alias!r} to {alias!r} ({slot.dimensions} dimensions; {where}). "
            f"Searches keep the live vectors until it is promoted."
        )
        if fill:
            self.fill(slot, database, show=options["verbosity"] >= 1 and not options["no_progress"], err=options.get("stderr") or sys.stderr)
        else:
            self.stdout.write("The workers fill it now.")
        self.stdout.write(f"  follow:   manage.py semantic_status {name}")
        self.stdout.write(f"  compare:  manage.py semantic_evaluate {name} --queries FILE --compare-next")
        self.stdout.write(f"  promote:  manage.py semantic_promote {name}   (undo: --rollback)")

    def fill(self, slot, using, *, show, err):
        counts = slot.count_statuses(using)
        with tqdm(total=counts["pending"], desc=f"{slot.label} filling", unit=" rows", dynamic_ncols=True, mininterval=0.5, file=err, disable=not show) as bar:
            failed = []
            while True:
                result = embed_stale_rows(slot, using, skip=failed)
                failed.extend(result.failed)
                bar.update(result.written + len(result.failed))
                if not result.claimed:
                    break
        counts = slot.count_statuses(using)
        self.stdout.write(f"Filled: {counts['fresh']:,} of {counts['with_text']:,} rows with text fresh in the next slot, {counts['failed']:,} failed.")
