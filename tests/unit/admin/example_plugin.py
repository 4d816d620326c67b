"""A test plugin that adds console commands through pgrelay_admin_commands (loaded with plugins = <this file>)."""

from pgrelay import hookimpl
from pgrelay.admin.commands import AdminError, ResultSet


def show_widgets(ctx, arg):
    return ResultSet([("widget", "text"), ("count", "int8")], [("sprocket", 3), ("gear", None)])


def frob(ctx, arg):
    if not arg:
        raise AdminError("FROB needs a widget")
    return [ResultSet([("frobbed", "text")], [(arg,)]), "FROB"]


@hookimpl
def pgrelay_admin_commands(relay, commands):
    commands.add("SHOW WIDGETS", show_widgets, doc="Widgets", admin=False)
    commands.add("FROB", frob, args="<widget>", doc="Frob a widget")
