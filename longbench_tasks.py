"""LongBench v1 (Bai et al. 2023, arXiv 2308.14508) as LongLLaDA's Table 1 ran it (REFERENCE.md section 8): through
OpenCompass 0.4.2's LongBench configs and evaluators, not THUDM's pred.py / eval.py. The tasks, OpenCompass's
prompts, the middle truncation, and every metric written out, equal to the packages OpenCompass scored with (`rouge`
1.0.1, fuzzywuzzy with python-Levenshtein, jieba 0.42.1), quirks included; no dependency but jieba, and that only
for the three Chinese metrics, imported where used."""
import re
import string
from collections import Counter

from model import UserError

# task: (language, category, metric, max_new_tokens: OpenCompass's max_out_len)
TASKS = {
    "narrativeqa": ("en", "Single-doc QA", "qa_f1", 128), "qasper": ("en", "Single-doc QA", "qa_f1", 32),
    "multifieldqa_en": ("en", "Single-doc QA", "qa_f1", 64),
    "multifieldqa_zh": ("zh", "Single-doc QA", "qa_f1_zh", 64),
    "hotpotqa": ("en", "Multi-doc QA", "qa_f1", 32), "2wikimqa": ("en", "Multi-doc QA", "qa_f1", 32),
    "musique": ("en", "Multi-doc QA", "qa_f1", 32), "dureader": ("zh", "Multi-doc QA", "rouge_zh", 128),
    "gov_report": ("en", "Summarization", "rouge", 512), "qmsum": ("en", "Summarization", "rouge", 512),
    "multi_news": ("en", "Summarization", "rouge", 512), "vcsum": ("zh", "Summarization", "rouge_zh", 512),
    "trec": ("en", "Few-shot", "classification", 64), "triviaqa": ("en", "Few-shot", "qa_f1", 32),
    "samsum": ("en", "Few-shot", "rouge", 128), "lsht": ("zh", "Few-shot", "classification", 64),
    "passage_count": ("en", "Synthetic", "count", 32), "passage_retrieval_en": ("en", "Synthetic", "retrieval", 32),
    "passage_retrieval_zh": ("zh", "Synthetic", "retrieval_zh", 32),
    "lcc": ("code", "Code", "code_sim", 64), "repobench-p": ("code", "Code", "code_sim", 64)}
CATEGORIES = ["Single-doc QA", "Multi-doc QA", "Summarization", "Few-shot", "Synthetic", "Code"]
FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")  # OpenCompass's pred_postprocessor: the first line only
NO_INPUT = ("gov_report", "multi_news", "vcsum", "lcc", "passage_count")  # their loader rows have no `input`

_QA = ("Answer the question based on the given passages. Only give me the answer and do not output any other words.")
# THUDM's config/dataset2prompt.json as OpenCompass's configs have it, which differ in three places: qasper takes the
# multi-doc QA prompt, narrativeqa's "asconcisely" is fixed (twice), multi_news ends with one more newline.
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    "question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
    "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
    "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
    "question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
    "{input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
    "\n\n问题：{input}\n回答：",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
    "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
    "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
    "in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
    "Now, write a one-page summary of all the news.\n\nSummary:\n",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
    "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
    "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
    "{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
    "carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
    "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count "
    "of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
    "3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
    "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
    "number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph "
    "2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
    "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n"}
PROMPTS |= {t: PROMPTS["qasper"] for t in ("hotpotqa", "2wikimqa", "musique")}


def build_prompt(task, record):
    """The text OpenCompass fed the model (no chat template): each field of the loader's row in turn, `input` (if the
    task has one), `context`, then the answer field (`answers`; trec and lsht: `all_labels`) replaced by '', as plain
    text. So a literal '{answers}' in a context vanishes and an input's '{context}' receives the context."""
    text = PROMPTS[task]
    for key in ["input"] * (task not in NO_INPUT) + ["context"]:
        text = text.replace("{" + key + "}", record[key])
    return text.replace("{all_labels}" if task in ("trec", "lsht") else "{answers}", "")


def truncate_middle(ids, max_len):
    """LongLLaDA's drop_middle: ids[:L // 2] + ids[-L // 2:] when longer than L. -L // 2 is (-L) // 2, so the tail
    keeps ceil(L / 2) ids: an odd L keeps L ids in all (THUDM's pred.py keeps int(L / 2) from each end)."""
    return ids if len(ids) <= max_len else ids[:max_len // 2] + ids[-max_len // 2:]


# --- the metrics (OpenCompass's opencompass/datasets/longbench/evaluators.py, THUDM's metrics.py) ---

CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_answer(s):
    """English: lower case, no ASCII punctuation, the words a / an / the replaced by a space, whitespace collapsed."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def normalize_zh_answer(s):
    """Chinese: lower case, no ASCII or Chinese punctuation, no whitespace at all."""
    return "".join("".join(ch for ch in s.lower() if ch not in set(string.punctuation + CN_PUNCTUATION)).split())


def f1(prediction, reference):
    """Token F1: the common tokens as multisets, 2PR / (P + R); 0 without any."""
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def jieba_cut(text):
    """Chinese words by jieba's default (precise) mode."""
    try:
        import jieba
    except ImportError:
        raise UserError("the Chinese metrics need the jieba package: pip install jieba==0.42.1") from None
    jieba.setLogLevel(60)  # no dictionary-loading messages
    return list(jieba.cut(text, cut_all=False))


def lcs_table(x, y):
    """T[i][j]: the length of the longest common subsequence of x[:i] and y[:j]."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, 1):
        for j, b in enumerate(y, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    return table


RECURSION_STEPS = 985  # rouge backtracks recursively, one frame a step: past about this many, Python's limit hits


def rouge_l(prediction, reference):
    """ROUGE-L F of the `rouge` package 1.0.1 (pltrdy), summary level, exactly: sentences split on '.' only (pieces
    of length > 0, whitespace collapsed), words split on ' '; m and n count the DISTINCT words of the reference and
    the prediction; U is the set of words on the LCS backtrack path of every (reference, prediction) sentence pair
    (from the end: equal words go diagonal, else up if T[i-1][j] > T[i][j-1], else left); R = |U| / m, P = |U| / n,
    F = 2PR / (P + R + 1e-8). Any error scores 0, as OpenCompass catches it: no sentence on either side, or a
    backtrack path of more than RECURSION_STEPS steps (RecursionError)."""
    hyp, ref = ([" ".join(p.split()) for p in text.split(".") if len(p) > 0] for text in (prediction, reference))
    if not hyp or not ref:
        return 0.0
    union = set()
    for x in (r.split(" ") for r in ref):
        for y in (h.split(" ") for h in hyp):
            table, i, j, steps = lcs_table(x, y), len(x), len(y), 0
            while i and j:
                steps += 1
                if x[i - 1] == y[j - 1]:
                    union.add(x[i - 1])
                    i, j = i - 1, j - 1
                elif table[i - 1][j] > table[i][j - 1]:
                    i -= 1
                else:
                    j -= 1
            if steps > RECURSION_STEPS:
                return 0.0
    m, n = (len({w for s in side for w in s.split(" ")}) for side in (ref, hyp))
    r, p = len(union) / m, len(union) / n
    return 2.0 * ((p * r) / (p + r + 1e-8))


def fuzz_ratio(a, b):
    """fuzzywuzzy's fuzz.ratio with python-Levenshtein (OpenCompass's environment; without it fuzzywuzzy uses difflib
    and other numbers): 100 for equal strings (two empty ones too), 0 if one is empty, else Levenshtein's
    1 - indel distance / (len a + len b), i.e. 2 LCS / (len a + len b), times 100, rounded half to even."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    lensum = len(a) + len(b)
    return int(round(100 * (1.0 - (lensum - 2 * lcs_table(a, b)[-1][-1]) / lensum)))


def classification(prediction, reference, all_classes):
    """1 / (number of classes named) if the gold one is among them, else 0, with OpenCompass's loop kept: it removes
    from the list it iterates over, so the class after each removed one is skipped."""
    em_match_list = [c for c in all_classes if c in prediction]
    for match_term in em_match_list:
        if match_term in reference and match_term != reference:
            em_match_list.remove(match_term)
    return 1.0 / len(em_match_list) if reference in em_match_list else 0.0


def numbers_equal(prediction, target):
    """The share of the numbers in the prediction that equal `target` (0 without numbers): count and retrieval."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(target) for n in numbers) / len(numbers) if numbers else 0.0


def score(task, prediction, answers, all_classes=None):
    """One record's score in [0, 1], as OpenCompass computes it (its task score is 100 x the mean): post-processing,
    then the best over the answers; classification, count and retrieval add over them instead (real records have one
    answer). The Chinese ROUGE and code similarity keep OpenCompass's reassignment of the prediction per answer."""
    metric = TASKS[task][2]
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if metric == "classification":
        return sum(classification(prediction, a, all_classes) for a in answers)
    if metric == "count":
        return sum(numbers_equal(prediction, a) for a in answers)
    if metric in ("retrieval", "retrieval_zh"):  # the gold paragraph's number
        pattern = r"Paragraph (\d+)" if metric == "retrieval" else r"段落(\d+)"
        return sum(numbers_equal(prediction, re.findall(pattern, a)[0]) for a in answers)
    best = 0.0
    for reference in answers:
        if metric == "qa_f1":
            value = f1(normalize_answer(prediction).split(), normalize_answer(reference).split())
        elif metric == "qa_f1_zh":
            value = f1(*([w for w in map(normalize_zh_answer, jieba_cut(t)) if w] for t in (prediction, reference)))
        elif metric == "code_sim":
            prediction = next((line for line in prediction.lstrip("\n").split("\n")
                               if "`" not in line and "#" not in line and "//" not in line), "")
            value = fuzz_ratio(prediction, reference) / 100
        else:
            if metric == "rouge_zh":
                prediction, reference = " ".join(jieba_cut(prediction)), " ".join(jieba_cut(reference))
            value = rouge_l(prediction, reference)
        best = max(best, value)
    return best
