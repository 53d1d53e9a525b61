// The sampling settings panel (sliders with number boxes, stop sequences, seed), shared by
// the playground and the chat.

import { $, clamp, el, formatStops, parseStops, visibleToken } from "./util.js";

// name: the server's setting; the request field is `request` (OpenAI's names). The advanced ones
// sit in a fold and go into a request only when they do something (`neutral`: they do nothing).
export const SLIDERS = [
  { name: "max_new_tokens", request: "max_tokens", label: "Max new tokens", min: 1, max: 2048, step: 1, int: true,
    hint: "Length of the continuation, in tokens." },
  { name: "temperature", request: "temperature", label: "Temperature", min: 0, max: 2, step: 0.01,
    hint: "0 always picks the most likely token; higher is more varied." },
  { name: "top_p", request: "top_p", label: "Top-p", min: 0.01, max: 1, step: 0.01,
    hint: "Sample from the smallest set of tokens holding this much probability." },
  { name: "top_k", request: "top_k", label: "Top-k", min: 0, max: 200, step: 1, int: true,
    hint: "Sample from the k most likely tokens; 0 turns it off." },
  { name: "min_p", request: "min_p", label: "Min-p", min: 0, max: 1, step: 0.01, advanced: true, neutral: 0,
    hint: "Drop tokens less likely than this fraction of the most likely one; 0 turns it off." },
  { name: "repetition_penalty", request: "repetition_penalty", label: "Repetition penalty", min: 1, max: 2, step: 0.01,
    inputMin: 0.01, inputMax: 10, advanced: true, neutral: 1,
    hint: "Above 1 makes tokens already in the text less likely (divides their score)." },
  { name: "presence_penalty", request: "presence_penalty", label: "Presence penalty", min: -2, max: 2, step: 0.01,
    advanced: true, neutral: 0, hint: "Subtracted once from every token already in the text: above 0, new topics." },
  { name: "frequency_penalty", request: "frequency_penalty", label: "Frequency penalty", min: -2, max: 2, step: 0.01,
    advanced: true, neutral: 0, hint: "Subtracted for each time a token already appeared: above 0, fewer repeats." },
];

const FALLBACK = { max_new_tokens: 128, temperature: 0.8, top_p: 0.95, top_k: 40, min_p: 0, repetition_penalty: 1.0,
  presence_penalty: 0, frequency_penalty: 0 };

export class Settings {
  constructor({ onChange = () => {} } = {}) {
    this.onChange = onChange;
    this.defaults = { ...FALLBACK };
    this.inputs = {};
    for (const spec of SLIDERS) {
      const box = $(spec.advanced ? "#sliders-advanced" : "#sliders");
      const num = el("input", {
        type: "number", id: `set-${spec.name}`, "data-testid": `setting-${spec.name}`,
        min: spec.inputMin ?? spec.min, max: spec.inputMax ?? spec.max, step: spec.step, inputMode: spec.int ? "numeric" : "decimal",
      });
      const range = el("input", {
        type: "range", id: `set-${spec.name}-range`, "data-testid": `range-${spec.name}`,
        min: spec.min, max: spec.max, step: spec.step, "aria-label": spec.label,
      });
      range.addEventListener("input", () => {
        num.value = this.format(spec, Number(range.value));
        this.changed();
      });
      num.addEventListener("input", () => {
        if (num.value !== "" && isFinite(Number(num.value))) range.value = String(Number(num.value));
        this.changed();
      });
      num.addEventListener("change", () => {
        // Out-of-range or empty: fall back into range when the user leaves the box.
        const lo = spec.inputMin ?? spec.min;
        const hi = spec.inputMax ?? spec.max;
        const v = num.value === "" || !isFinite(Number(num.value)) ? this.defaults[spec.name] : clamp(Number(num.value), lo, hi);
        this.setOne(spec.name, v);
        this.changed();
      });
      this.inputs[spec.name] = { num, range, spec };
      box.append(
        el("div", { class: "field slider" },
          el("div", { class: "field-row" }, el("label", { htmlFor: num.id }, spec.label), num),
          range,
          el("small", { class: "hint" }, spec.hint)),
      );
    }
    // Token healing (on, as on the server): off goes into a request as token_healing: false.
    this.healingInput = el("input", { type: "checkbox", id: "set-token_healing", "data-testid": "setting-token_healing",
      checked: true });
    this.healingInput.addEventListener("change", () => this.changed());
    $("#sliders-advanced").append(
      el("div", { class: "field" },
        el("label", { class: "check", htmlFor: this.healingInput.id }, this.healingInput, "Token healing"),
        el("small", { class: "hint" },
          "A prompt that ends in a space, a newline or punctuation goes on as the model would have written it " +
          "(a newline and its indent are one token). Off: the prompt's last token stays as it is.")),
    );
    // JSON output: response_format json_object, or json_schema with the schema in the box.
    this.jsonInput = el("input", { type: "checkbox", id: "set-json", "data-testid": "setting-json" });
    this.schemaInput = el("textarea", { id: "set-json-schema", "data-testid": "setting-json-schema", rows: 4,
      spellcheck: false, placeholder: '{"type": "object", "properties": {"name": {"type": "string"}}}',
      "aria-label": "JSON schema (optional)" });
    this.schemaHint = el("small", { class: "hint", "data-testid": "json-schema-hint" });
    this.schemaBox = el("div", { class: "json-schema" }, this.schemaInput, this.schemaHint);
    for (const [input, event] of [[this.jsonInput, "change"], [this.schemaInput, "input"]]) {
      input.addEventListener(event, () => {
        this.renderJson();
        this.changed();
      });
    }
    $("#sliders-advanced").append(
      el("div", { class: "field" },
        el("label", { class: "check", htmlFor: this.jsonInput.id }, this.jsonInput, "JSON output"),
        el("small", { class: "hint" },
          "The text is a JSON object, or JSON valid for the schema below (empty: any object)."),
        this.schemaBox),
    );
    this.renderJson();
    this.stopInput = $("#stop-input");
    this.seedInput = $("#seed-input");
    this.stopInput.addEventListener("input", () => {
      this.renderStops();
      this.changed();
    });
    this.seedInput.addEventListener("input", () => this.changed());
    $("#settings-reset").addEventListener("click", () => {
      this.apply(this.defaults, []);
      this.seedInput.value = "";
      this.jsonInput.checked = false; // (the schema text stays, for turning it on again)
      this.renderJson();
      this.changed();
    });
  }

  format(spec, v) {
    return spec.int ? String(Math.round(v)) : String(Math.round(v * 100) / 100);
  }

  setDefaults(defaults, contextLength) {
    for (const k of Object.keys(FALLBACK)) if (typeof defaults?.[k] === "number") this.defaults[k] = defaults[k];
    if (contextLength) {
      const { range, num } = this.inputs.max_new_tokens;
      range.max = String(Math.min(4096, contextLength));
      num.max = String(contextLength);
    }
  }

  setOne(name, value) {
    const { num, range, spec } = this.inputs[name];
    num.value = this.format(spec, value);
    range.value = String(value);
  }

  /** Fills the sliders from a settings object (defaults for the ones it lacks) and the stops. */
  apply(settings, stop) {
    for (const spec of SLIDERS) this.setOne(spec.name, settings?.[spec.name] ?? this.defaults[spec.name]);
    this.healingInput.checked = typeof settings?.token_healing === "boolean" ? settings.token_healing : true;
    if (stop !== undefined) {
      this.stopInput.value = formatStops(stop);
      this.renderStops();
    }
    this.renderCount();
  }

  /** The schema box shows while JSON output is on; a schema that is not JSON is flagged. */
  renderJson() {
    this.schemaBox.hidden = !this.jsonInput.checked;
    const { error } = this.schema();
    this.schemaHint.textContent = error ? `Not valid JSON: ${error}` : "";
    this.schemaHint.classList.toggle("bad", !!error);
  }

  /** The schema box's JSON: {schema} (null when empty) or {error}. */
  schema() {
    const text = this.schemaInput.value.trim();
    if (!text) return { schema: null };
    try {
      return { schema: JSON.parse(text) };
    } catch (err) {
      return { error: err.message };
    }
  }

  /** OpenAI's response_format for the JSON toggle, or null (free text). A box that is not JSON
   * goes as its text: the server's 400 says what is wrong where the page shows errors. */
  responseFormat() {
    if (!this.jsonInput.checked) return null;
    const { schema, error } = this.schema();
    if (!error && schema === null) return { type: "json_object" };
    return { type: "json_schema", json_schema: { name: "schema", schema: error ? this.schemaInput.value : schema } };
  }

  renderCount() {
    const n = this.changedAdvanced().length + (this.healingInput.checked ? 0 : 1) + (this.jsonInput.checked ? 1 : 0);
    $("#advanced-count").textContent = n ? `· ${n} on` : "";
  }

  renderStops() {
    const stops = parseStops(this.stopInput.value);
    $("#stop-chips").replaceChildren(...stops.map((s) => el("code", { class: "chip", title: JSON.stringify(s) }, visibleToken(s))));
  }

  get stops() {
    return parseStops(this.stopInput.value);
  }

  get seed() {
    const v = this.seedInput.value.trim();
    return v === "" || !isFinite(Number(v)) ? null : Math.trunc(Number(v));
  }

  /** Current values keyed by the server's setting names. */
  values() {
    const out = {};
    for (const { num, spec } of Object.values(this.inputs)) {
      const v = Number(num.value);
      out[spec.name] = num.value === "" || !isFinite(v) ? this.defaults[spec.name] : spec.int ? Math.round(v) : v;
    }
    out.token_healing = this.healingInput.checked;
    return out;
  }

  /** The advanced settings that do something (not at their neutral value). */
  changedAdvanced() {
    const v = this.values();
    return SLIDERS.filter((s) => s.advanced && v[s.name] !== s.neutral);
  }

  /** The OpenAI-style request fields; `withStops` for the playground only. */
  request({ withStops = true } = {}) {
    const v = this.values();
    const body = {};
    for (const spec of SLIDERS) if (!spec.advanced || v[spec.name] !== spec.neutral) body[spec.request] = v[spec.name];
    if (!v.token_healing) body.token_healing = false;
    if (withStops) {
      const stop = this.stops;
      if (stop.length) body.stop = stop;
    }
    const seed = this.seed;
    if (seed !== null) body.seed = seed;
    const format = this.responseFormat();
    if (format) body.response_format = format;
    return body;
  }

  /** For remembering across reloads. */
  state() {
    return { values: this.values(), stop: this.stopInput.value, seed: this.seedInput.value,
      json: this.jsonInput.checked, schema: this.schemaInput.value };
  }

  restore(saved) {
    if (!saved) return;
    this.apply(saved.values || {}, undefined);
    if (typeof saved.stop === "string") this.stopInput.value = saved.stop;
    if (typeof saved.seed === "string") this.seedInput.value = saved.seed;
    this.jsonInput.checked = saved.json === true;
    if (typeof saved.schema === "string") this.schemaInput.value = saved.schema;
    this.renderJson();
    this.renderStops();
  }

  changed() {
    this.renderCount();
    this.onChange(this.state());
  }
}
