// comfyui-oft: show each OFT node's report on the node itself after a run.
//
// The nodes return their report as `ui.PreviewText` ({"text": [report]}). ComfyUI stores it in /history and sends it
// with the "executed" websocket message, but the frontend (1.27.10) draws such text only for nodes that have their
// own extension (core's Preview Any has one): without this file the report reached no node. Here every OFT node that
// reports gets a read-only text box, added on its first report and filled on every run (cached runs report too).
//
// The box is not a setting: it is left out of the saved workflow (widgets_values) and of the prompt sent to the
// server, so adding it shifts no widget value and never changes the node's cache key.

import { app } from "../../scripts/app.js";

const REPORTING_NODES = new Set([
    "OFTLoader", "OFTLoadAdapter", "OFTApply", "OFTInspect", "OFTBlockStrength", "OFTBlend", "OFTMerge", "OFTSave",
]);
const WIDGET_NAME = "oft_report";

function reportText(message) {
    const text = message?.text;
    if (text == null) return null;
    return Array.isArray(text) ? text.join("\n") : String(text);
}

function reportWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (widget) return widget;
    const el = document.createElement("textarea");
    el.className = "comfy-multiline-input oft-report";
    el.readOnly = true;
    el.spellcheck = false;
    el.dataset.oftReport = String(node.id);
    el.style.whiteSpace = "pre-wrap";
    el.style.fontFamily = "monospace";
    el.style.fontSize = "11px";
    widget = node.addDOMWidget(WIDGET_NAME, "oft_report", el, {
        getValue: () => el.value,
        setValue: (v) => { el.value = v ?? ""; },
        getMinHeight: () => 64,
        serialize: false,  // not sent to the server (graphToPrompt reads options.serialize)
    });
    widget.serialize = false;  // not stored in widgets_values (LGraphNode.serialize / configure read this)
    widget.inputEl = el;
    return widget;
}

function showReport(node, text) {
    const widget = reportWidget(node);
    widget.value = text;
    const warn = /(^|\n)WARNING:/.test(text);
    widget.inputEl.style.color = warn ? "#ffb347" : "";
    widget.inputEl.title = warn ? "This report has a warning" : "";
    const lines = Math.min(text.split("\n").length, 12);
    const want = node.computeSize();
    node.setSize([Math.max(node.size[0], want[0], 360), Math.max(node.size[1], want[1] + 14 * (lines - 1))]);
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "comfyui-oft.NodeReports",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!REPORTING_NODES.has(nodeData.name)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = reportText(message);
            if (text != null) showReport(this, text);
        };
    },
});
