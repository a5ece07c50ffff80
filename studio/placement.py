"""Where a run of the Train tab goes: this machine on the devices picked (or
the first free ones; a run whose devices are busy waits in the work
directory's queue, ``backend.devices.queue``), or the Slurm cluster
(``backend.slurm``: an sbatch script written into the run folder, shown here
before it is submitted). The Slurm fields are generated from
``backend.slurm.SlurmOptions``, so the form and ``ftstudio submit`` take the
same options. Handlers are module level and take plain values; ``build``
only lays out."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import gradio as gr

from backend import slurm
from backend.devices.inventory import InventoryError, inventory
from backend.slurm import SlurmError, SlurmOptions

from .context import StudioError

WHERE_LOCAL, WHERE_SLURM = "this machine", "Slurm cluster"
AUTO = "auto"
SLURM_HELP = {  # the form's words for SlurmOptions' fields (the CLI's --help says the same)
    "partition": "empty: the cluster's default", "nodes": "machines", "gpus_per_node": "0: a CPU job",
    "ntasks_per_node": "ranks per machine; 0: one per GPU", "time": "90, 02:00:00 or 1-12:00; empty: the "
    "partition's limit", "account": "to charge; empty: yours", "chdir": "where relative data paths are read from",
}


@dataclass
class Placement:
    where: gr.Radio
    devices: gr.CheckboxGroup
    slurm_box: gr.Group
    slurm_fields: list  # components, in SlurmOptions' field order

    @property
    def inputs(self) -> list:
        return [self.devices, self.where, *self.slurm_fields]


def where_choices() -> list[str]:
    return [WHERE_LOCAL, WHERE_SLURM] if slurm.available() else [WHERE_LOCAL]


def device_choices() -> list[tuple[str, str]]:
    """(label, id) per device of this machine."""
    try:
        found = inventory()
    except InventoryError:
        return []
    return [(f"{d.id}: {d.name}, {d.memory_total_mb / 1024:,.0f} GiB", d.id) for d in found]


def devices_arg(picked) -> str:
    """The picker's ticks -> the launcher's ``--devices`` value ("auto" when none is ticked)."""
    ids = [str(p).strip() for p in (picked or []) if str(p).strip()]
    known = {i for _, i in device_choices()}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise StudioError(f"devices {', '.join(unknown)}: not devices of this machine (it has "
                          f"{', '.join(sorted(known)) or 'none'})")
    return ",".join(ids) or AUTO


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(SlurmOptions)
    return int if int in (typing.get_args(hints[f.name]) or (hints[f.name],)) else str


def slurm_options(values) -> SlurmOptions:
    """The Slurm fields' values -> SlurmOptions (checked; SlurmError names the field)."""
    kwargs = {}
    for f, raw in zip(dataclasses.fields(SlurmOptions), values):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue  # empty: the option's default
        if _field_type(f) is int:
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise SlurmError(f"{f.name.replace('_', '-')} {raw!r}: give a whole number") from None
            if not number.is_integer():
                raise SlurmError(f"{f.name.replace('_', '-')} {raw!r}: give a whole number")
            if number == 0 and f.default is None:
                continue  # 0 in a box whose option has no default number: the option's default
            kwargs[f.name] = int(number)
        else:
            kwargs[f.name] = str(raw).strip()
    options = SlurmOptions(**kwargs)
    options.check()
    return options


def is_slurm(where) -> bool:
    if where not in (WHERE_LOCAL, WHERE_SLURM, None, ""):
        raise StudioError(f"where {where!r}: pick {WHERE_LOCAL!r} or {WHERE_SLURM!r}")
    return where == WHERE_SLURM


def build() -> Placement:
    with gr.Row():
        where = gr.Radio(where_choices(), value=WHERE_LOCAL, label="Where", elem_id="train-where", scale=1,
                         info="the Slurm cluster when sbatch is on this machine's PATH")
        devices = gr.CheckboxGroup(device_choices(), value=[], label="Devices", elem_id="train-devices", scale=3,
                                   info="none ticked: the first free ones; busy ones: the run waits in the queue")
    with gr.Group(visible=False) as box:
        with gr.Row():
            components = []
            for f in dataclasses.fields(SlurmOptions):
                label, info = f"Slurm {f.name.replace('_', ' ')}", SLURM_HELP.get(f.name, "")
                elem_id = "train-slurm-" + f.name.replace("_", "-")
                if _field_type(f) is int:
                    # never empty (a caller of the API may leave the input out and get this default)
                    comp = gr.Number(value=f.default or 0, precision=0, label=label, info=info, elem_id=elem_id)
                else:
                    comp = gr.Textbox(value=f.default or "", label=label, info=info, elem_id=elem_id)
                components.append(comp)
    where.change(lambda w: (gr.Group(visible=w == WHERE_SLURM), gr.CheckboxGroup(visible=w != WHERE_SLURM)),
                 where, [box, devices], api_visibility="private")
    return Placement(where, devices, box, components)
