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
    "OFTExtractLoRA", "OFTTrainer",
]);
const WIDGET_NAME = "oft_report";

function reportText(message) {
    const text = message?.text;
    if (text == null) return null;
    return Array.isArray(text) ? text.join("\n") : String(text);
}

const LINE_PX = 13;  // 11px monospace text
const CHAR_PX = 6.7;
const MAX_BOX_PX = 260;  // longer reports scroll inside the box

// Warnings first: a user must see them without scrolling the box.
function ordered(text) {
    const lines = text.split("\n");
    const warnings = lines.filter((l) => l.startsWith("WARNING:"));
    return [...warnings, ...lines.filter((l) => !l.startsWith("WARNING:"))].join("\n");
}

// Height of the box for `text` at the node's width (wrapped lines counted), within [3 lines, MAX_BOX_PX].
function boxHeight(node, text) {
    const perLine = Math.max(20, Math.floor((node.size[0] - 30) / CHAR_PX));
    const lines = text.split("\n").reduce((n, l) => n + Math.max(1, Math.ceil(l.length / perLine)), 0);
    return Math.min(MAX_BOX_PX, Math.max(3 * LINE_PX, lines * LINE_PX) + 12);
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
    el.style.lineHeight = `${LINE_PX}px`;
    widget = node.addDOMWidget(WIDGET_NAME, "oft_report", el, {
        getValue: () => el.value,
        setValue: (v) => { el.value = v ?? ""; },
        getMinHeight: () => boxHeight(node, el.value),
        serialize: false,  // not sent to the server (graphToPrompt reads options.serialize)
    });
    widget.serialize = false;  // not stored in widgets_values (LGraphNode.serialize / configure read this)
    widget.inputEl = el;
    return widget;
}

function showReport(node, text) {
    const widget = reportWidget(node);
    const shown = ordered(text);
    widget.value = shown;
    const warn = shown.startsWith("WARNING:");
    widget.inputEl.style.color = warn ? "#ffb347" : "";
    widget.inputEl.title = warn ? "This report has a warning (first lines)" : "";
    if (node.size[0] < 420) node.setSize([420, node.size[1]]);
    const want = node.computeSize();
    node.setSize([node.size[0], Math.max(want[1], node.size[1])]);
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
