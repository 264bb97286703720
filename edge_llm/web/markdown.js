// Model output -> safe HTML.
//
// Model text is untrusted: markdown-it runs with raw HTML off, highlight.js
// colours fenced code, and DOMPurify (with a tag allow-list) cleans every
// string before it reaches the DOM. Images are off too: an <img> would make
// the browser fetch a URL the model chose, leaving the appliance's origin.
import MarkdownIt from './vendor/markdown-it/markdown-it.esm.min.js';
import DOMPurify from './vendor/dompurify/purify.es.js';
import hljs from './vendor/highlight.js/es/core.min.js';
// Keep in step with LANGUAGES in scripts/vendor-web.
import python from './vendor/highlight.js/es/languages/python.min.js';
import javascript from './vendor/highlight.js/es/languages/javascript.min.js';
import typescript from './vendor/highlight.js/es/languages/typescript.min.js';
import bash from './vendor/highlight.js/es/languages/bash.min.js';
import json from './vendor/highlight.js/es/languages/json.min.js';
import c from './vendor/highlight.js/es/languages/c.min.js';
import cpp from './vendor/highlight.js/es/languages/cpp.min.js';
import rust from './vendor/highlight.js/es/languages/rust.min.js';
import go from './vendor/highlight.js/es/languages/go.min.js';
import sql from './vendor/highlight.js/es/languages/sql.min.js';
import yaml from './vendor/highlight.js/es/languages/yaml.min.js';
import xml from './vendor/highlight.js/es/languages/xml.min.js';

const LANGUAGES = { python, javascript, typescript, bash, json, c, cpp, rust, go, sql, yaml, xml };
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);
// The grammars bring their own aliases (py, js, ts, sh, html, c++, rs, yml...).
hljs.registerAliases(['shell', 'console', 'shellsession'], { languageName: 'bash' });

const md = new MarkdownIt({
  html: false,
  linkify: false,
  typographer: false,
  highlight(code, lang) {
    if (!lang || !hljs.getLanguage(lang)) return ''; // markdown-it escapes it
    try {
      return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    } catch {
      return '';
    }
  },
});
md.disable('image');

// Table alignment comes out as style="text-align:..."; a CSP without
// 'unsafe-inline' refuses style attributes (a console error per cell), so
// turn it into a class that style.css knows.
md.core.ruler.push('align_to_class', (state) => {
  for (const token of state.tokens) {
    const style = token.attrs ? token.attrGet('style') : null;
    if (style === null) continue;
    token.attrs = token.attrs.filter(([name]) => name !== 'style');
    const align = /text-align:\s*(left|right|center)/.exec(style);
    if (align) token.attrJoin('class', `align-${align[1]}`);
  }
});

const PURIFY = {
  ALLOWED_TAGS: [
    'p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'blockquote',
    'ul', 'ol', 'li', 'pre', 'code', 'span', 'em', 'strong', 's', 'a',
    'table', 'thead', 'tbody', 'tr', 'th', 'td',
  ],
  ALLOWED_ATTR: ['href', 'title', 'class', 'start'],
  // The page dispatches clicks on data-action: model output must not carry its own.
  ALLOW_DATA_ATTR: false,
};

// Links from the model open in a new tab, never replacing the chat page.
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

/** Markdown text -> sanitised HTML string. */
export function toSafeHtml(text) {
  return DOMPurify.sanitize(md.render(text), PURIFY);
}

// History is rendered again whenever the thread is rebuilt; finished answers
// never change, so their HTML is kept (bounded: cleared when it grows large).
const cache = new Map();

/** Render markdown `text` into `el`; `live` answers skip the cache. */
export function renderMarkdown(el, text, { live = false } = {}) {
  let html = live ? null : cache.get(text);
  if (html === undefined || html === null) {
    html = toSafeHtml(text);
    if (!live) {
      if (cache.size > 300) cache.clear();
      cache.set(text, html);
    }
  }
  el.innerHTML = html; // DOMPurify output only
  decorateCodeBlocks(el);
}

// Wrap each <pre> in a frame with its language and a Copy button. Done on the
// DOM after sanitising, so the button is ours and never comes from the model.
function decorateCodeBlocks(root) {
  for (const pre of root.querySelectorAll('pre')) {
    const code = pre.querySelector('code');
    const lang = /(?:^|\s)language-(\S+)/.exec(code?.className ?? '')?.[1] ?? '';
    const frame = document.createElement('div');
    frame.className = 'codeblock';
    const head = document.createElement('div');
    head.className = 'codeblock-head';
    const label = document.createElement('span');
    label.textContent = lang || 'text';
    const copy = document.createElement('button');
    copy.type = 'button';
    copy.className = 'btn btn-small btn-ghost';
    copy.dataset.action = 'copy';
    copy.textContent = 'Copy';
    head.append(label, copy);
    if (code) code.classList.add('hljs');
    pre.replaceWith(frame);
    frame.append(head, pre);
  }
}
