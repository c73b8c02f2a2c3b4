"""Word lists and patterns of the rules analyzer (Russian, Kazakh-flavoured Russian, English).

Every pattern runs on normalised text: lower case, `ё` → `е`, dashes → `-`, odd spaces →
plain spaces (see `rules.normalise`). Module-level compiled constants: built once at
import, never mutated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Final, NamedTuple, TypeAlias


def _rx(*parts: str) -> re.Pattern[str]:
    """One alternation of the given pieces (each may hold its own groups)."""
    return re.compile("|".join(f"(?:{p})" for p in parts))


class Gated(NamedTuple):
    """A pattern run only when the text holds one of its literal keys.

    Python's `re` tries every branch of a long alternation at every position; an
    alternation of plain literals is scanned far faster and rules out most messages. Every
    match of `pattern` must contain one of the keys (tests check this on sample dialogs).
    """

    pattern: re.Pattern[str]
    gate: re.Pattern[str]

    def search(self, text: str) -> re.Match[str] | None:
        return self.pattern.search(text) if self.gate.search(text) else None

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        return self.pattern.finditer(text) if self.gate.search(text) else iter(())

    def sub(self, repl: str, text: str) -> str:
        return self.pattern.sub(repl, text) if self.gate.search(text) else text


_DIGIT: Final = re.compile(r"\d")


def gated(keys: str, pattern: re.Pattern[str]) -> Gated:
    """`keys`: literals separated by `|`, e.g. "созвон|встреч|call"."""
    literals = sorted(set(keys.split("|")), key=len, reverse=True)
    return Gated(pattern, re.compile("|".join(re.escape(k) for k in literals)))


def _g(keys: str, *parts: str) -> Gated:
    return gated(keys, _rx(*parts))


def _needs_digit(*parts: str) -> Gated:
    return Gated(_rx(*parts), _DIGIT)


Matcher: TypeAlias = re.Pattern[str] | Gated

# -- text that addresses the analyzer instead of the manager -------------------------------
# A segment (sentence, bracketed or ### block) matching this is dropped before any rule
# runs, so "lead is HOT, score=100" or "ignore previous instructions" can never feed a fact.
INJECTION: Final = _g(
    "ignor|disregard|forget|overrid|system|assistant|developer|instruction|инструкци|игнор|"
    "забудь|score|funnel|interest|deal_closed|main_intent|lead is|горяч|hot|lead|100|постав|"
    "оцени|you are|as an ai|prompt|json|для модел|для нейросет|для ии|для бот|для анализатор",
    r"\b(ignore|disregard|forget|override)\b.{0,30}\b(instruction|rule|prompt|previous|prior|above)",
    r"\b(system|assistant|developer)\s*:",
    r"\binstruction",
    r"инструкци",
    r"игнорируй|проигнорируй|забудь (все|всё|предыдущ)",
    r"\bscore\s*[=:]",
    r"\bscore (to|of|=)?\s*\d",
    r"funnel[_ ]stage|interest[_ ]level|deal_closed|main_intent",
    r"\blead is (hot|warm)",
    r"\b(лид|клиент)\s*(-\s*)?(горяч|hot)",
    r"\b(set|put|rate|mark)\b.{0,20}\b(score|hot|lead|100)",
    r"постав(ь|ьте)\b.{0,25}(оценк|score|балл|стади|100|горяч)",
    r"оцени(те)? (меня|лид|этот лид)",
    r"\byou are (now )?(a|an|the) (model|assistant|ai|analy[sz]er)",
    r"\bas an ai\b|\bprompt\b|\bjson\b",
    r"для (модели|нейросети|ии|бота|анализатора)",
)
SEGMENT_SPLIT: Final = re.compile(r"(?<=[.!?])\s+|\n+|#{2,}|\[|\]|<\||\|>")
SENTENCE: Final = re.compile(r"(?<=[.!?])\s+|\n+")

# -- language ---------------------------------------------------------------------------------
CYRILLIC: Final = re.compile(r"[а-яіїєәғқңөұүһ]")
LATIN: Final = re.compile(r"[a-z]")

# -- niche ------------------------------------------------------------------------------------
# (pattern, weight, business type in Russian, in English). Medicine needs weight 2+.
MEDICINE_TERMS: Final[tuple[tuple[Matcher, int, str, str], ...]] = (
    (
        _g("стомат|стамат|дантист|dent", r"стомат|стамат|дантист|\bdent(al|ist|istry)\b"),
        3,
        "стоматология",
        "dentistry",
    ),
    (
        re.compile(r"ортодонт|имплантац|брекет|элайнер|винир|orthodont"),
        2,
        "стоматология",
        "dentistry",
    ),
    (
        re.compile(r"эстетическ\w*+ медицин|aesthetic (medicine|clinic)"),
        3,
        "эстетическая медицина",
        "aesthetic medicine",
    ),
    (
        re.compile(r"пластическ\w*+ хирург|plastic surg"),
        3,
        "пластическая хирургия",
        "plastic surgery",
    ),
    (re.compile(r"косметолог|cosmetolog"), 3, "косметология", "cosmetology"),
    (_g("лор", r"лор[- ]клиник|\bлор\b|отоларинголог"), 3, "ЛОР-клиника", "ENT clinic"),
    (re.compile(r"кардиолог"), 3, "кардиология", "cardiology"),
    (re.compile(r"офтальмолог|ophthalm"), 3, "офтальмология", "ophthalmology"),
    (
        re.compile(r"гинеколог|уролог|дерматолог|невролог|педиатр|эндокринолог|маммолог|онколог"),
        3,
        "медицинский центр",
        "medical centre",
    ),
    (
        _g(
            "физиотерап|physio|реабилитац|rehab",
            r"физиотерап|physiother|\bphysio\b|реабилитац|rehab",
        ),
        3,
        "реабилитация",
        "physiotherapy",
    ),
    (
        _g(
            "лаборатор|lab|диагностик|анализы|узи|мрт|кт|чек-ап|check",
            r"лаборатор|\blab(oratory)?\b.{0,10}(test|diagnos)|диагностик|анализы",
            r"\bузи\b|\bмрт\b|\bкт\b|чек-ап|check-?up",
        ),
        2,
        "диагностика",
        "diagnostics",
    ),
    (
        _g(
            "мед|medical cent",
            r"мед\.?\s?центр|медцентр|медицинск\w*+ центр|медициналық|medical cent(er|re)",
        ),
        3,
        "медицинский центр",
        "medical centre",
    ),
    (re.compile(r"клиник|clinic|госпитал|hospital|больниц|поликлиник"), 2, "клиника", "clinic"),
    (
        _g(
            "медицин|medical|врач|доктор|dr.|doctor|пациент|patient|лечени|ботокс|botox|филлер|"
            "filler|лазерн",
            r"медицин|medical|\bврач|главврач|доктор|\bdr\.|doctor|пациент|patient|лечени",
            r"ботокс|botox|филлер|filler|лазерн\w*+ (эпиляц|омолож)",
        ),
        1,
        "медицина",
        "medicine",
    ),
)
INFO_TERMS: Final[tuple[tuple[Matcher, int, str, str], ...]] = (
    (
        _g(
            "онлайн|online school|школ",
            r"онлайн[- ]?школ|online school",
            r"школ\w*+ (английского|рисования|программирования|шахмат)",
        ),
        4,
        "онлайн-школа",
        "online school",
    ),
    (
        _g(
            "онлайн|online|self-paced",
            r"онлайн[- ]?(курс|обучени|программ|марафон|академи|проект|продукт|урок|заняти|класс)",
            r"online ([a-z]+ )?(course|program|coaching|training|academy|class|lesson|school"
            r"|workshop)",
            r"self-paced",
        ),
        4,
        "онлайн-курс",
        "online course",
    ),
    (
        re.compile(r"инфобиз|инфопродукт|infobusiness|info-?product"),
        4,
        "инфобизнес",
        "infobusiness",
    ),
    (
        _g(
            "курс|course|авторск",
            r"\bкурс(ы|а|ов|ом|ами)?\b(?! (лечени|процедур|терапи|доллар|валют))",
            r"\bcourses?\b|авторск\w*+ (курс|программ|методик)",
        ),
        2,
        "онлайн-курс",
        "online course",
    ),
    (
        _g(
            "вебинар|webinar|марафон|интенсив|наставни|менторств|mentor",
            r"вебинар|webinar|марафон|интенсив|наставни|менторств|\bmentor",
        ),
        3,
        "онлайн-обучение",
        "online education",
    ),
    (
        _g(
            "коуч|coach|продюсер|producer|запуск|launch|групповая программа|group program",
            r"коуч|\bcoach|продюсер|\bproducer\b|запуск(и|ов|ах)\b|\blaunch(es)?\b",
            r"групповая программа|group program",
        ),
        3,
        "коучинг / запуски",
        "coaching / launches",
    ),
    (
        _g(
            "эксперт|expert|нутрициолог|психолог|астролог|таро|эзотерик|блог|ютуб|youtube",
            r"эксперт|\bexpert\b|нутрициолог|психолог|астролог|таро|эзотерик|блогер|\bблог\b",
            r"ютуб|youtube",
        ),
        1,
        "экспертный блог",
        "expert blog",
    ),
    (
        _g(
            "учени|студент|student|поток|teach|преподаю|обучаю|обучени",
            r"учени[кц]|студент|\bstudents?\b|\bпоток(а|и|ов)?\b|\bteach\b|преподаю|обучаю|обучени",
        ),
        1,
        "обучение",
        "education",
    ),
)
# Businesses outside the two target niches: recognising one makes the business "known".
# The first that matches names the business type, so specific entries come first.
OTHER_BUSINESS: Final[tuple[tuple[Matcher, str, str], ...]] = (
    (
        _g(
            "ресторан|кафе|кофейн|restaurant|cafe|bar",
            r"ресторан|кафе\b|кофейн|restaurant|\bcafe\b|\bbar\b",
        ),
        "ресторан",
        "restaurant",
    ),
    (
        _g(
            "автосервис|автомойк|детейлинг|шиномонтаж|сто|car |detailing",
            r"автосервис|автомойк|детейлинг|шиномонтаж|\bсто\b|car (service|wash)|detailing",
        ),
        "автосервис",
        "car service",
    ),
    (re.compile(r"недвижимост|real estate|риэлт|застройщ"), "недвижимость", "real estate"),
    (
        _g(
            "фитнес|спортзал|тренажерн|gym|fitness|йога",
            r"фитнес|спортзал|тренажерн|\bgym\b|fitness club|йога-студи",
        ),
        "фитнес-клуб",
        "fitness club",
    ),
    (
        re.compile(r"юридическ|юрист|адвокат|банкротств|law firm|lawyer"),
        "юридические услуги",
        "legal services",
    ),
    (
        re.compile(r"ремонт телефон|сервисн\w*+ центр|phone repair"),
        "ремонт техники",
        "repair service",
    ),
    (re.compile(r"цвет(ы|очн)|flower"), "цветочный магазин", "flower shop"),
    (re.compile(r"мебел|furniture"), "мебель", "furniture"),
    (
        re.compile(r"строим|строительн|каркасн|construction|ремонт квартир"),
        "строительство",
        "construction",
    ),
    (
        re.compile(r"детск\w*+ сад|садик|балабақша|kindergarten|детский центр"),
        "детский сад",
        "kindergarten",
    ),
    (
        re.compile(r"барбер|парикмахер|салон красоты|beauty salon|маникюр|nail|brow|ресниц"),
        "салон красоты",
        "beauty salon",
    ),
    (
        _g(
            "магазин|shop|store|commerce|sell|прода",
            r"магазин|\bshop\b|\bstore\b|e-?commerce|sell .{0,20}online|продаем",
        ),
        "магазин",
        "shop",
    ),
    (re.compile(r"производств|завод|factory|manufactur"), "производство", "manufacturing"),
    (re.compile(r"проект|project|стартап|startup|бренд|brand"), "проект", "project"),
    (
        _g("массаж|спа|spa|massage", r"массаж|\bспа\b|\bspa\b|massage"),
        "массаж / спа",
        "massage / spa",
    ),
    (re.compile(r"салон|salon|ателье|бутик|boutique|шоурум|showroom"), "салон", "salon"),
    (
        re.compile(r"студи|studio|школ[аы] (танц|вождения|языков)|автошкол|dance school"),
        "студия",
        "studio",
    ),
    (
        re.compile(
            r"пекарн|кондитерск|bakery|кейтеринг|catering|клининг|cleaning|типограф|хостел|hostel"
        ),
        "услуги",
        "services",
    ),
    (re.compile(r"туристическ|турагент|travel agency|отель|гостиниц|hotel"), "туризм", "travel"),
    (re.compile(r"доставк|delivery"), "доставка", "delivery"),
    (
        _g(
            "агентств|agency|компани|company|фирм|бизнес|business|ип|тоо|ооо|точк|филиал",
            r"агентство|agency|компани|company|фирм|бизнес|business",
            r"\bип\b|\bтоо\b|\bооо\b|точк[иа]|филиал",
        ),
        "бизнес",
        "business",
    ),
)
# Sentences of the manager about the agency itself ("кейсы клиник", "we work with") are
# no evidence of the contact's niche.
AGENCY_TALK: Final = re.compile(r"\b(мы|наш\w*+|нам|кейс\w*+|we|our|us|case)\b")

# A contact who sells targeting/SMM work (first person), not a client.
TARGETOLOGIST_SELF: Final = _g(
    "таргетолог|smm|смм|маркетолог|фрилансер|медиабайер|трафик|специалист по|занимаюсь|"
    "настраиваю|веду|ведем|targetologist|media|ads|ppc|freelance|закончил",
    r"(?<!не )\bя +((?!не\b)[^\s.!?]++ +){0,2}?(таргетолог|smm|смм|маркетолог[- ]фрилансер"
    r"|фрилансер|медиабайер|трафик-?менеджер|трафиколог|специалист по (таргет|рекламе|smm|смм))",
    r"(?<!не )\bя\s*-\s*(таргетолог|smm|смм)",
    r"\bя\s+внешн\w*+ таргетолог",
    r"(занимаюсь|настраиваю) (настройкой )?(таргет|рекламы? для|smm|смм|ведением)",
    r"\b(веду|ведем|ведём) (\S++\s+){0,2}(клиник|клиентам|салон|проект|бизнес)\w*+"
    r" на (фриланс|аутсорс)",
    r"\bi'?m an? (freelance |independent )?(targetologist|media ?buyer|smm|ads? specialist"
    r"|facebook ads|meta ads|ppc)",
    r"\bfreelance (media ?buyer|targetologist|smm|marketer|ads)",
    r"закончил\w*+ курсы? по (таргет|smm|смм|рекламе)",
)
TARGETOLOGIST_OFFER: Final = _g(
    "предложить|субподряд|нужн|нужен|в команду|возьмете|портфолио|тестовое|ищу|стажировк|"
    "test task|outsourc|looking for|internship|portfolio",
    r"предложить (свои )?(услуги|сотрудничество)|субподряд",
    r"нужн\w*+ ли вам (подрядчик|специалист|таргетолог)",
    r"нужен (ли )?(вам )?(специалист|таргетолог)|в команду\?|возьмете|портфолио|тестовое",
    r"ищу (новых )?(работу|стажировку|подработку|заказчиков|клиентов|проекты)|стажировк",
    r"test task|outsourc|looking for (a )?(job|work|clients|projects|internship)|internship",
    r"portfolio",
)
# An in-house employee (SMM of a clinic) is not a freelance targetologist.
IN_HOUSE: Final = re.compile(
    r"в штате|штатн|in-house|в штат\b|работаю в (клиник|компани|салон|школ)|я не таргетолог"
)
FREELANCE: Final = re.compile(r"фриланс|аутсорс|freelanc")
MARKETING_WORDS: Final = re.compile(
    r"таргет|smm|смм|реклам|маркет|media ?buy|ads\b|контент|трафик|лидоген|lead ?gen"
)
JOB_SEEKER: Final = _g(
    "ваканси|резюме|ищу|стажировк|возьмете|resume|cv|looking for|job|hiring",
    r"вакансi|ваканси|резюме|ищу (работу|подработку|стажировку)|стажировк",
    r"возьмете (меня|на работу)",
    r"\b(resume|cv)\b|looking for (a )?(job|work)|job opening|are you hiring",
)
NOT_BUSINESS: Final = _g(
    "не бизнес|не для бизнеса|для себя|личн|частное лицо|подписчик|not a business|personal|"
    "followers",
    r"не бизнес|не для бизнеса|для себя|личн\w*+ (страниц|блог|аккаунт)|частное лицо",
    r"больше подписчиков|not a business|personal (page|account|profile)|more followers",
)

# -- owner ------------------------------------------------------------------------------------
OWNER_NOUN: Final = _g(
    "владел|собственни|основател|хозя|учредител|owner|founder|иесі",
    r"(со)?владел(ец|иц[аы]?|ьцы)\b|собственни(к|ца|ки|цы)\b|(со)?основател(ь|ьница|и)\b",
    r"хозя(ин|йка|ева)\b|(со)?учредител(ь|и)\b|сооснователь|единственный учредитель",
    r"\b(co-?)?owner\b|\b(co-?)?founder\b|\bиесі(мін)?\b",
)
# An owner mentioned in the third person: "она владелица", "собственник поручил",
# "утверждать будет учредитель".
_OWNERS = r"((со)?владел|собственни|хозя|основател|(со)?учредител)"
OWNER_THIRD_PERSON: Final = _g(
    "владел|собственни|хозя|основател|учредител|руководител|директор|начальни|автор|owner|founder",
    rf"\b(он|она|они)\s*(же\s*)?(и\s*)?(-\s*)?(\S++\s+)?{_OWNERS}\w*+",
    r"((со)?владел|собственни|хозя|основател|учредител|руководител|директор|начальни|автор)\w*+"
    r"\s*(-\s*)?(\S++\s+){0,1}(попросил|поручил|дал|хочет|сказал|посмотрел|решил|просил|выделил"
    r"|инвестор|согласу|принимает|в клинике)",
    r"(?<!i'm )(?<!i am )\bthe (owner|founder)\b|\bowner'?s\b",
    r"(у|от|для|к) (владельц|собственник|хозя|руководител)\w*+",
    r"владельцу|собственнику|хозяину|руководителю|директору",
    r"(утвержда|утвердит|решает|решать|решит|согласовыва|одобря|одобрит|принимает|подписывает)\w*+"
    rf"\s+(\S++\s+)?({_OWNERS}|руководител|директор)\w*+",
)
OWNER_CLAIM: Final = _g(
    "i own|i run|i founded|i created|we own|mine|my|owner|founder|на себя|на мне|мо|сво|"
    "өзімдікі|владел",
    r"\bi (own|run|founded|created)\b|\bwe own\b|\bit'?s mine\b|\bmy own\b",
    r"\bmy ([a-z]+ )?(business|clinic|school|company|shop|course|program|practice|studio|salon"
    r"|store|brand|agency)",
    r"\bi'?m (the |a )?(co-?)?(owner|founder)|owner and|founder and",
    r"работаю на себя|(тоо|ип|юрлицо|юр\.? ?лицо|бизнес|клиника|школа|курс)\w*+ на мне",
    r"на мне (тоо|ип|юрлицо)",
    r"(?<!не )\b(мой|моя|мое|мои|свой|своя|свое|өзімдікі)\b",
    r"\bмыс? (с \S+ )?(со)?владел",
)
# "мой руководитель" is no claim of ownership.
NOT_OWNER_FOLLOWERS: Final = re.compile(
    r"(мой|моя|мое|мои|свой|своя|свое)\s+(руководител|начальни|директор|босс|шеф|клиент"
    r"|работодател|заказчик)"
)
# "не владелец": the noun right after "не" is denied.
ENDS_WITH_NOT: Final = re.compile(r"\bне\s*$")
HAS_MY: Final = gated(
    "меня|менде|мене",
    re.compile(r"\b(у меня|менде|у мене)\b"),
)
MY_EXCLUDED: Final = re.compile(r"на ведении|у меня (клиент|заказчик|таргетолог|вопрос|опыт)")
OWNER_NEGATION: Final = _g(
    "не мо|не владел|не собственни|не хозя|не основател|not|наемн|hired",
    r"не (мой|моя|мое|мои)\b|(клиника|бизнес|школа|компания|салон) не (моя|мой|мое)",
    r"не (владел|собственни|хозя|основател)|\bnot (the |an? )?(owner|founder)|\bnot mine\b",
    r"\bнаемн|\bнаёмн|\bhired\b",
)
NON_OWNER_ROLE: Final = _g(
    "админ|менеджер|манагер|управляющ|сотрудни|маркетолог|smm|смм|ассистент|помощни|секретар|"
    "продюсер|врач|работаю|admin|manager|assistant|employee|marketer|producer|receptionist|"
    "coordinator|work|отвечаю|занимаюсь|собираю|согласовываю|финальное слово|signs off|"
    "директор|head of|cmo|руководител|начальни|босс|шеф|boss",
    r"\b(я|i'?m|i am) +([^\s.!?]++ +){0,3}?(администратор|админ|менеджер|управляющ(ий|ая)(?! партн)"
    r"|сотрудни|маркетолог|smm|смм|ассистент|помощни|секретар|продюсер|главврач|главн\w*+ врач"
    r"|работаю(?! на себя)|administrator|admin|manager|assistant|employee|marketer|producer"
    r"|receptionist|coordinator|work)",
    r"\bсотрудник\b|\bадминистратор\b|\bманагер\b|маркетолог|\bпродюсер\b|\bproducer\b",
    r"управляющ(ий|ая)\b(?! партн)|главврач|главн\w*+ врач",
    r"(исполнительн|коммерческ|операционн|наемн|наёмн)\w*+ директор",
    r"директор по (маркетингу|развитию|продажам)|\bhead of\b|\bcmo\b",
    r"marketing (director|lead|manager)",
    r"отвечаю за маркетинг|занимаюсь маркетингом|собираю (информацию|предложения)|согласовываю с",
    r"финальное слово за (ней|ним|автором|руководител|собственник|владел)|signs off",
    r"i work (at|for|in)\b|работаю (в|у)\b",
    r"(мой|моя|наш|наша) (руководител|начальни|директор|босс|шеф)|\bmy (boss|manager)\b",
)
# "Вы владелец?" (the contact) and "Решение принимает руководитель?" (somebody else).
OWNER_QUESTION_2P: Final = _g(
    "вы|ты|ваш|тво|на вас|собственный|you",
    r"\b(вы|ты)\b.{0,30}((со)?владел|собственни|основател|учредител|хозя|руководител|автор"
    r"|сами принимаете|принимаете решени)",
    r"((со)?владел|собственни|основател|хозя|автор)\w*+\s*(-\s*)?\b(вы|ты)\b",
    r"\b(ваш|ваша|ваше|ваши|твой|твоя)\b.{0,20}\?|на вас\?|\bсобственный\?",
    r"\b(are you|you are|is it your|is this your|do you own)\b.{0,40}"
    r"(owner|founder|creator|own|business|decision)",
    r"(clinic|school|business|course|company) (is )?yours\?|your own (business|company)",
)
OWNER_QUESTION_3P: Final = _g(
    "руководител|собственник|владел|директор|автор|expert|owner|принимает|за |by |who",
    r"(руководител\w*+|собственник\w*+|владел\w*+|директор\w*+|автор|expert|owner)\s*\?",
    r"принимает (руководител|собственник|владел|директор|автор)",
    r"(за|by) (собственник|владел|руководител|директор|автор|the owner|the expert)\w*+",
    r"who (makes|approves|signs|decides)",
)
# "Да", "Рустам. Да, ...": one optional leading word. Possessive quantifiers keep a long run
# of punctuation from backtracking (it is both \W and \S).
AFFIRMATIVE: Final = re.compile(
    r"^\W*+(?:\w++\W++)?(да|иә|ия|ага|угу|конечно|верно|так точно|точно|именно|ес|yes|yep|yeah|yup"
    r"|sure|correct|of course|right)\b"
)
NEGATIVE_START: Final = re.compile(r"^\W*(нет|не|no|nope|not)\b")
NOPE_START: Final = re.compile(r"^\W*(неа|nope)\b")

# -- money ------------------------------------------------------------------------------------
_NUM = r"\d+(?:[ ,.]\d{3})*(?:[.,]\d+)?"
_MULT = (
    r"к|k|тыс\.?|тысяч[аи]?|тыщ[аи]?|т\.р\.?|млн\.?|миллион(?:а|ов)?|mln|mio|m|лям(?:а|ов)?|мың|мын"
)
_CUR = (
    r"руб(?:лей|ля|\.)?|р\.?|₽|rub|тенге|тг|тңг|₸|kzt|\$|usd|долл(?:ар(?:ов|а)?)?|dollars?|bucks"
    r"|euros?|eur|евро|€|£|gbp|фунт(?:ов)?|сом(?:ов)?|сум(?:ов)?|aed|дирхам(?:ов)?|грн|uah|лир"
    r"|теңге|cad|aud|chf|sgd"
)
_APPROX = (
    r"(?:(?:где-?то|около|примерно|порядка|приблизительно|до|от|максимум|не больше|about|around"
    r"|approx\.?|up to|roughly|~|≈)\s*)?"
)
_RANGE = rf"{_NUM}(?:\s*(?:-|до|to)\s*{_NUM})?"
_PERIOD = (
    r"(?:\s*(?:в\s*мес(?:яц)?\.?|/\s*мес\.?|ежемесячно|per month|a month|/\s*mo(?:nth)?|monthly"
    r"|на старт|for a start))?"
)
# "$2000", "тысяч 60 рублей", "AED 10,000", "150-200к тенге", "1,5 млн": the client's words,
# with "около" before and "в месяц" after kept in the match.
MONEY: Final = Gated(
    re.compile(
        rf"(?P<approx>{_APPROX})(?:"
        rf"(?P<pcur>[$€£])\s?(?P<pnum>{_RANGE})\s?(?P<pmult>{_MULT})?(?![\w])"
        rf"|(?P<rmult>тысяч|тыс\.?|тыщ)\s+(?P<rnum>{_RANGE})\s*(?P<rcur>{_CUR})?(?![\w])"
        rf"|(?P<rcur2>aed|usd|eur|kzt|rub|cad|aud|gbp|chf)\s?(?P<cnum>{_RANGE})\s?"
        rf"(?P<cmult>{_MULT})?(?![\w])"
        rf"|(?P<num>{_RANGE})\s?(?P<mult>{_MULT})?\s?(?P<cur>{_CUR})?(?![\w])"
        rf"){_PERIOD}"
    ),
    _DIGIT,
)
_WORD_NUM = (
    r"сто|двести|триста|четыреста|пятьсот|шестьсот|семьсот|восемьсот|девятьсот|пятьдесят|сорок"
    r"|тридцать|двадцать|десять"
)
WORD_MONEY: Final = re.compile(
    r"(?P<approx>(?:где-?то|около|примерно|до)\s*)?"
    rf"(?P<words>полмиллиона|пол миллиона|пол ляма|(?:{_WORD_NUM})\s+(?:тысяч|тыс|к)\b"
    rf"|(?:тысяч|тыщ)\s+(?:{_WORD_NUM})\b|миллион\b)"
    r"(?:\s*(?P<cur>руб\w*+|тенге|тг|₸|₽|долл\w*+))?"
    rf"{_PERIOD}"
)
WORD_VALUES: Final[Mapping[str, float]] = MappingProxyType(
    {
        "сто": 100e3,
        "двести": 200e3,
        "триста": 300e3,
        "четыреста": 400e3,
        "пятьсот": 500e3,
        "шестьсот": 600e3,
        "семьсот": 700e3,
        "восемьсот": 800e3,
        "девятьсот": 900e3,
        "пятьдесят": 50e3,
        "сорок": 40e3,
        "тридцать": 30e3,
        "двадцать": 20e3,
        "десять": 10e3,
        "миллион": 1e6,
    }
)
MONEY_HINT: Final = gated(
    "0|1|2|3|4|5|6|7|8|9|тысяч|миллион|лям|тыс", re.compile(r"\d|тысяч|миллион|лям|тыс")
)
MULTIPLIERS: Final[tuple[tuple[str, float], ...]] = (
    ("млн", 1e6),
    ("миллион", 1e6),
    ("mln", 1e6),
    ("mio", 1e6),
    ("лям", 1e6),
    ("m", 1e6),
    ("тыс", 1e3),
    ("тыщ", 1e3),
    ("т.р", 1e3),
    ("к", 1e3),
    ("k", 1e3),
    ("мың", 1e3),
    ("мын", 1e3),
)
# Rough USD value of one unit (prefix of the currency word): only to tell a "far too small"
# budget from a real one.
CURRENCY_USD: Final[tuple[tuple[str, float], ...]] = (
    ("тенге", 0.002),
    ("теңге", 0.002),
    ("тг", 0.002),
    ("тңг", 0.002),
    ("₸", 0.002),
    ("kzt", 0.002),
    ("мың", 0.002),
    ("мын", 0.002),
    ("$", 1.0),
    ("usd", 1.0),
    ("долл", 1.0),
    ("dollar", 1.0),
    ("bucks", 1.0),
    ("€", 1.08),
    ("eur", 1.08),
    ("евро", 1.08),
    ("£", 1.27),
    ("gbp", 1.27),
    ("фунт", 1.27),
    ("aed", 0.27),
    ("cad", 0.73),
    ("aud", 0.66),
    ("chf", 1.1),
    ("sgd", 0.74),
    ("дирхам", 0.27),
    ("сом", 0.011),
    ("сум", 0.00008),
    ("грн", 0.024),
    ("uah", 0.024),
    ("лир", 0.03),
    ("руб", 0.011),
    ("р", 0.011),
    ("₽", 0.011),
    ("rub", 0.011),
)
# An amount without a currency: roubles/tenge-sized in Russian dialogs, dollars in English.
UNKNOWN_CURRENCY_USD: Final[Mapping[str, float]] = MappingProxyType({"ru": 0.011, "en": 1.0})
TOO_SMALL_USD: Final = 150.0
# Words right after a number that make it a count, not money ("5к подписчиков").
NOT_MONEY_AFTER: Final = re.compile(
    r"^\s*(подписчик|followers|просмотр|views|лид|заяв|человек|клиент|продаж|учени|студент"
    r"|students|leads|subscribers|консультац|пациент|звонк|%|процент|лет|год|раз|штук|шт"
    r"|квадрат|м2|кв|минут|час|дн|недел|месяц)"
)
# Money that is a price, a cost per lead, revenue or a competitor's offer, not an ad budget.
NOT_BUDGET_CONTEXT: Final = re.compile(
    r"дешевле|дороже|стоит|стоимост|цена|прайс|за ведение|сопровожден|\bfee\b|\bprice\b|\bcost"
    r"|скидк|средний чек|\bчек\b|выручк|оборот|revenue|turnover|зарплат|salary|прибыл|profit"
    r"|за (заявку|лид|клиента)|per lead|\bcpl\b"
)
PER_UNIT_BEFORE: Final = re.compile(r"(\bпо|\bза|\bper)\s*$")
BUDGET_WORD: Final = re.compile(r"бюджет\w*+|budget")
BUDGET_WORDS: Final = re.compile(
    r"бюджет|budget|реклам|трафик|продвижен|таргет|директ|вклад|влож|инвест|выдел|заклад|трат"
    r"|spend|\bads\b|advertis|marketing|ежемесячно|monthly|в месяц|в мес|/мес|per month|/mo"
    r"|a month|на старт|for a start|на запуск|могу|можем|готов|can do|can spend|планиру|думали"
)
BUDGET_QUESTION: Final = _g(
    "бюджет|budget|spend|сколько|сумм|объем|объём|вложени|инвестировать|how much",
    r"бюджет|budget|ad spend|advertising spend|\bspend\b",
    r"сколько.{0,40}(трат|вклад|влож|инвест|выдел|заклад|готов|направля|идет на|идёт на|обходит"
    r"|на рекламу|на продвижение|на трафик)",
    r"(какую|какая|какой|каков) (сумм|объем|объём)|сумм\w*+ (на|в месяц)|вложени|инвестировать",
    r"how much.{0,40}(ads|advertising|marketing|spend|invest)",
)
BUDGET_REFUSAL: Final = _g(
    "не скажу|не знаю|не назову|не определ|не скажем|нет бюджета|без бюджета|know|not sure|"
    "no budget",
    r"(бюджет|сумм)\w*+.{0,15}не (скажу|знаю|назову|определ|скажем)|не (скажу|назову)",
    r"нет бюджета|без бюджета|не знаю,? (какой|сколько)|\bi don'?t know\b|not sure yet",
    r"no budget",
)
# The manager repeating the facts back ("Напомню: ..., бюджет 700 тыс") and the client's "да".
RECAP_MARKERS: Final = re.compile(
    r"напомню|напоминаю|верно понимаю|правильно понимаю|уточню|\bвы\b|\bваш|you mentioned|to recap"
)
RECAP_CONFIRM: Final = re.compile(
    r"^\W*+(?:\w++\W++)?(да|верно|все верно|всё верно|так и есть|точно|именно|yes|correct|right)\b"
)

# -- funnel stage events ----------------------------------------------------------------------
PAID_CLIENT: Final = _g(
    "оплат|оплач|перев|подпис|платежк|чек|paid|payment|signed|transferred|аванс",
    r"(?<!не )\bоплатил[аи]?\b|(?<!не )\bоплачено\b|\bоплату (отправил|перевел|внес)\w*+",
    r"(?<!не )\bперевел[аи]?\b.{0,20}(оплат|деньг|предоплат|аванс|сумм)",
    r"(предоплат|аванс|оплат)\w*+ (перевел|отправил|внес|сделал)\w*+",
    r"внес(ла|ли)? (оплат|предоплат|аванс)",
    r"(?<!не )\bподписал[аи]?\b(?! бы)|договор\w*+ подписал",
    r"\bвот (платежк|чек)|\bплатежк|скриншот оплаты|\bчек об оплате",
    r"\b(i|we|i'?ve|we'?ve|just|already|have)\s+(just\s+|already\s+)?paid\b|paid the invoice",
    r"payment (is )?(done|sent|made)",
    r"\bsigned (the )?(contract|agreement)|\bwe signed\b|\bi signed\b",
    r"transferred the (money|payment)",
)
PAID_MANAGER: Final = _g(
    "оплат|деньги|платеж|поступлени|аванс|получили|видим|договор подписан|payment",
    r"(оплат\w*+|деньги|платеж\w*+|поступлени\w*+|предоплат\w*+|аванс)\s+"
    r"(получил|пришл|поступил|видим|прошл|зачислен)",
    r"(получили|видим)\s+(вашу\s+)?(оплат|поступлени|деньги|платеж|предоплат)",
    r"спасибо за оплату|благодарим за оплату|договор подписан",
    r"payment (received|has been received|came through|arrived)|received (your|the) payment",
    r"thanks? (you )?for (the |your )?payment",
)
COMPLETED: Final = _g(
    "встреч|созвон|звонок|звонк|консультац|время|разговор|беседу|беседы|демонстрац|zoom|"
    "обсуждени|видеозвон|call|meeting|consultation|time|встретились|пообщались|we talked",
    r"(спасибо|благодар\w*+)\s+(вам\s+)?(большое\s+)?за\s+(\S++\s+)?(встреч|созвон|звонок|консультац"
    r"|видеовстреч|время|разговор|беседу|демонстрац|zoom)",
    r"после\s+(\S++\s+)?(встреч|созвон|звонк|консультац|видеовстреч|разговор)",
    r"вчерашн\w*+\s+(\S++\s+)?(созвон|встреч|консультац|звонк|разговор)",
    r"по итогам\s+(\S++\s+)?(встреч|созвон|звонк|консультац|разговор|обсуждени|беседы|видеозвон)",
    r"как\s+(вам\s+)?прошл[аио]?\s+(\S++\s+)?(консультац|встреч|созвон|звонок|видеовстреч|разговор)",
    r"(созвон|встреча|консультация|звонок)\s+(был|была|прошл)",
    r"как (и )?(договорились|обсудили|обсуждали) на (встрече|созвоне|консультации)",
    r"after (our|the|yesterday'?s) (call|meeting|consultation|zoom)",
    r"thanks? (you )?for (the |our |your )?(call|meeting|time|consultation)",
    r"as (we )?(discussed|agreed) (on|during|in) (the|our) (call|meeting)",
    r"(great|good|nice) (call|meeting)|our call yesterday",
    r"how did (the|our) (call|meeting|consultation) go",
    r"\b(созвонились|встретились|пообщались со? (стратег|специалист|вашим|вами))",
    r"\bwe (had|did) (the|our|a) (call|meeting)|\bwe talked (yesterday|today|earlier)",
)
MEETING_STRICT: Final = _g(
    "созвон|звонок|звонка|позвон|встреч|консультац|zoom|зум|call|meet|демонстрац|по видео|"
    "видеосвяз|видеозвон|видеочат",
    r"созвон|звонок|звонка|позвон|встреч|консультац|zoom|\bзум\b|google meet|\bcall\b|\bmeeting",
    r"\bmeet\b|демонстрац|по видео|видеосвяз|видеозвон|видеочат",
)
ASK_WHEN: Final = re.compile(
    r"\bкогда\b.{0,20}(удобно|сможете|получится)?\?|когда\?|\bwhen\b.{0,30}\?"
)
_WEEKDAYS = (
    r"понедельник\w*+|вторник\w*+|сред[аеуы]\b|четверг\w*+|пятниц\w*+|суббот\w*+|воскресень\w*+"
    r"|дүйсенбі|сейсенбі|сәрсенбі|бейсенбі|\bжұма|\bсенбі|жексенбі"
    r"|monday|tuesday|wednesday|thursday|friday|saturday|sunday|\bmon\b|\btue\b|\bwed\b|\bthu\b"
    r"|\bfri\b"
)
_MONTHS = (
    r"январ|феврал|март|апрел|ма[яй]\b|июн|июл|август|сентябр|октябр|ноябр|декабр|january"
    r"|february|march|april|\bmay\b|june|july|august|september|october|november|december"
)
# A concrete time: a clock time or a number with "в"/"at"/a month ...
TIME_DIGITS: Final = _needs_digit(
    r"\b\d{1,2}[:.]\d{2}\b",
    r"\b\d{1,2}\s?(am|pm)\b|\bat \d{1,2}\b",
    r"\bв\s+\d{1,2}\b(?!\s*(тыс|к\b|%|раз|лет|год|дн|недел|месяц|человек|заяв|млн))",
    r"\bчас(а|ов)? в \d|\b\d{1,2} (утра|вечера|дня)\b",
    rf"\b\d{{1,2}}\s+({_MONTHS})",
    r"после \d{1,2}\b",
)
# ... or a named day ("в среду", "завтра", "в полдень"); a month alone is no date.
TIME_WORDS: Final = _g(
    "понедельник|вторник|сред|четверг|пятниц|суббот|воскресен|сенбі|жұма|mon|tue|wed|thu|fri|"
    "sat|sun|завтра|сегодня|tomorrow|today|tonight|ертең|полдень|обед|noon|утра|вечера",
    _WEEKDAYS,
    r"\b(завтра|послезавтра|сегодня|tomorrow|today|tonight|ертең)\b",
    r"\bв (полдень|обед)|после обеда|\bnoon\b",
    r"в (семь|восемь|девять|десять|одиннадцать|двенадцать|шесть|пять) (утра|вечера)",
)
BOOKING_CONFIRM: Final = _g(
    "записал|записыва|зафиксировал|подтверждаю|договорились|забронировал|бронирую|готово|"
    "confirmed|booked|invite|invitation|see you|приглашение|ссылк",
    r"\bзаписал[аи]?\b|\bзаписываю\b|зафиксировал|подтверждаю|\bдоговорились\b|забронировал",
    r"бронирую|\bготово\b",
    r"\bconfirmed\b|\bbooked\b|invite (is )?sent|sending (you )?the invite|invitation sent",
    r"see you (on|at|then)|calendar invite",
    r"приглашение (придет|придёт|отправ)|ссылк\w*+ (пришлю|отправлю|скину|придет|придёт)",
)
BOOKING_REMINDER: Final = _g(
    "напомина|напомню|reminder|через|завтра|сегодня|подключаюсь|ссылка на|в силе|still on",
    r"(напомина\w*+|напомню|reminder).{0,40}(встреч|созвон|звонок|консультац|call|meeting)",
    r"через (час|\d+ минут)\s+(встреча|созвон|звонок|консультация)",
    r"(встреча|созвон|видеовстреча) (завтра|сегодня)",
    r"подключаюсь к (встрече|созвону)|ссылка на (встречу|zoom|созвон)|всё в силе|все в силе",
    r"still on for",
    r"сегодня в \d{1,2}[:.]\d{2}\s+(видеовстреча|встреча|созвон)",
)
AGREE: Final = re.compile(
    r"^\W*+(?:\w++\W++)?(да|ок|окей|ok|okay|давайте|давай|удобно|подходит|подойдет|хорошо|го|жарайды"
    r"|болады|отлично|yes|yep|sure|works|fine|great|perfect|sounds good|записывайте|договорились"
    r"|согласен|согласна|идет|идёт|норм|можно|супер|ага|конечно|без проблем|no problem|of course"
    r"|absolutely|deal)\b"
)
DECLINE_TIME: Final = re.compile(
    r"не (могу|получится|смогу|удобно|подходит)|can'?t|cannot|won'?t work|doesn'?t work|не успева"
)
PROPOSAL: Final = re.compile(r"давайте|лучше|можно|предлагаю|let'?s|how about|what about")
# "пришлю завтра": a time in the client's message that is not a meeting slot.
LATER_ACTION: Final = re.compile(
    r"пришлю|отправлю|скину|вышлю|\bдам\b|сделаю|оплачу|подумаю|отвечу|вернусь|напишу|\bsend\b"
    r"|let you know|реален|реально"
)
# A decision to stay with / go to somebody else (a mere mention of another agency is not).
_COMPETITOR = (
    r"(решили|выбрали|остаемся|останемся|остаться|подписали|договорились|работать|уйдем|уходим)"
    r"\s+(\S++\s+){0,3}?(с |к |у )?(друг(им|ое|ого|ому|ой) (агентств|подрядчик|исполнител|компани)"
    r"|текущим подрядчиком)"
    r"|нашли (другое|другого|подрядчика|агентство|исполнителя)"
    r"|уже работаем с (другим|другой|агентств)"
    r"|decided to go with"
    r"|(gone|go|going|went) with (another|a different|someone else|somebody else)"
    r"|(chose|signed with|found|hired) (another|a different)"
)
LOST_CLIENT: Final = _g(
    "актуальн|интересн|не будем|отказ|откаж|передумал|отменя|отмена|решили|выбрали|остаемся|"
    "останемся|остаться|подписали|договорились|работать|уйдем|уходим|нашли|уже работаем|возьмем|"
    "не пиш|не звон|не беспок|удалите|нет|no thank|no, thank|not interested|no longer|decided|"
    "another|a different|someone else|somebody else|ourselves|in-house|pass|cancel|stop|"
    "unsubscribe|too much|потянем|карман",
    r"\bне\s?актуальн|\bне\s?интересн|(пока\s+)?не будем\b|отказыва|откажемся|отказались|передумал",
    r"отменя(ем|ю)\b|\bотмена\b|решили (не |остаться|работать с друг|пойти к|выбрать друг)",
    _COMPETITOR,
    r"решили (сами|своими силами|делать сами)|возьмем (своего|специалиста) в штат",
    r"не пишите|не звоните|не беспокойте|удалите (мой )?номер",
    r"спасибо,?\s+нет\b|нет,?\s+спасибо|\bno,? thanks?\b|not interested",
    r"no longer (interested|need)",
    r"we'?ll pass|\bcancel(l?ed|ling)?\b",
    r"(decided|going|prefer|we'?ll|will) to (keep|do|handle|run) (it|this|everything)"
    r" (in-house|ourselves)",
    r"keep it in-house|decided not to|(do|handle) it ourselves",
    r"stop (messaging|texting|writing)|unsubscribe|too much for us|не потянем|не по карману",
)
RESCHEDULE: Final = re.compile(
    r"перенес|перенос|перенест|reschedul|другое время|another time|other time"
)
LOST_MANAGER: Final = _g(
    "жаль|передумаете|вернуться|отменяю|закрываю|sorry to hear|change your mind",
    r"жаль,? что (вы )?(решили|выбрали|отказ|не подошл|не получилось)",
    r"если передумаете|если захотите вернуться|отменяю (встречу|запись|созвон)",
    r"закрываю (вашу )?заявку|sorry to hear|if you change your mind",
)
PRICE_OBJECTION: Final = gated(
    "дорог|слишком|потянем|карман|expensive|too much|pricey|over our budget",
    re.compile(
        r"дорого|дороговато|слишком (дорог|много)|(для нас|для меня)?,? ?это слишком\b|не потянем"
        r"|не по карману|expensive|too much|pricey|over our budget"
    ),
)
# "Дорого" said about these is about the agency's offer, not about past ads.
PRICE_SUBJECT: Final = re.compile(r"прайс|цен[аыу]|стоимост|услуг|\bваш|\byour\b|price|\bfee")
# A manager message that names a price or sends an offer: a price objection answers it.
PRICE_TALK: Final = re.compile(
    r"\d|стоимост|цен[аыу]|прайс|сопровожден|тариф|пакет|предложени|\bкп\b|счет|счёт|price|fee"
    r"|cost|proposal|offer|package"
)
NOT_FIT_MANAGER: Final = _g(
    "подрядчик|специалист|стажер|стажёр|сотрудник|таргетолог|ваканси|не набираем|"
    "расширять команду|не привлекаем|с таким бюджетом|минимальный бюджет|работаем только|"
    "не работаем|к сожалению|увы|work only|only work|work with|in-house|not hiring|"
    "minimum budget",
    r"(подрядчик\w*+|специалист\w*+|стажер\w*+|стажёр\w*+|сотрудник\w*+|таргетолог\w*+)\s+"
    r"(сейчас |пока )?не (ищем|набираем|привлекаем|нужн)",
    r"вакансий (сейчас )?нет|ваканси\w*+ (уже )?закрыта|не набираем|расширять команду не",
    r"не привлекаем|с таким бюджетом|минимальный бюджет|работаем только с бизнес",
    r"не работаем с (так|ваш|эт)",
    r"(к сожалению|увы),? (мы )?(не работаем|не берем|не беремся|не сможем (вам )?помочь)",
    r"we work only with business|only work with business|we (don'?t|do not) work with",
    r"keep everything in-house|not hiring|minimum budget",
)
REFUSAL: Final = _g(
    "не скажу|не назову|не буду|не хочу|не ваше дело|зачем вам|won|not going|not gonna|"
    "none of your business|why do you need",
    r"не (скажу|назову)|не (буду|хочу) (ничего )?(такого )?(говорить|рассказывать|отвечать"
    r"|сообщать)",
    r"не ваше дело|зачем вам (это|эта|эти|знать)",
    r"won'?t (tell|share|say)|not (going to|gonna) (tell|share)|none of your business",
    r"why do you need",
)

# -- other facts ------------------------------------------------------------------------------
INSTAGRAM_URL: Final = gated(
    "instagr",
    re.compile(r"(?:https?://)?(?:www\.)?(?:instagram\.com|instagr\.am)/[a-z0-9_.]{2,30}/?"),
)
INSTAGRAM_CONTEXT: Final = gated(
    "инст|insta|ig",
    re.compile(r"инст|insta|instagram|инстаграм|\big\b|инсту"),
)
HANDLE: Final = re.compile(r"(?<![\w.@])@([A-Za-z0-9_.]{3,30})(?![\w@])")
SALES_DEPT_NO: Final = _g(
    "продаж|sales",
    r"(нет|без) отдела продаж|отдела? продаж (у нас )?нет|отдел продаж не",
    r"no sales (team|department)|don'?t have (a )?sales",
)
SALES_DEPT_YES: Final = _g(
    "продаж|sales|колл|call",
    r"(есть|у нас) отдел продаж|отдел продаж есть|менеджер\w*+ по продажам",
    r"колл-?центр|call[- ]cent",
    r"(have|has) a sales (team|department)|sales (team|department|managers?)\b",
)
SALES_DEPT_QUESTION: Final = re.compile(
    r"отдел продаж|sales (team|department)|кто обрабатывает|who handles"
)
ADS_NOW_NO: Final = _g(
    "реклам|не запускал|только|not really|organic|only posting|no ads|run ads|haven",
    r"реклам\w*+ не (запуска|идет|идёт|крутим|ведем|ведём|давал)|не запускал|нет рекламы",
    r"рекламы нет|только (сарафан|органик|органика|авито|2гис|яндекс карт|инстаграм)",
    r"сейчас только органика",
    r"\bnot really\b|just organic|only organic|only posting|no ads|don'?t run ads|haven'?t run",
)
ADS_NOW_YES: Final = _g(
    "крутим|запуска|ведет|ведёт|реклам|директ|таргет|we run|currently run|running|ads",
    r"крутим|запускаем|запускаю|ведет фрилансер|ведёт фрилансер|ведет таргетолог|ведёт таргетолог",
    r"реклама идет|реклама идёт|директ ведет|директ ведёт",
    r"сейчас (\S++\s+)?(таргет|директ|реклам)|реклам\w*+ у блогер|таргет вк|вк таргет|директ,",
    r"\bдирект\b",
    r"we run|currently run|running (ads|meta|fb|facebook|google)|\b(meta|fb|facebook|google) ads\b",
)
ADS_QUESTION: Final = re.compile(r"реклам|таргет|продвиж|ads|advertis|paid promotion")

# -- intent, objection, action ---------------------------------------------------------------
AI_WORDS: Final = gated(
    "ии|ai|нейросет|искусствен|gpt",
    re.compile(r"\bии\b|\bai\b|нейросет|искусственн|chatgpt|gpt"),
)
TARGET_TOPIC: Final = re.compile(r"таргет|target|реклам|\bads\b")
AUDIT_WORDS: Final = re.compile(
    r"аудит|анализ (рекламы|маркетинга|воронки)|разбор (рекламы|аккаунта)|audit"
)
WANT_CALL: Final = re.compile(
    r"созвонимся|позвоните|давайте созвон|можно созвон|хочу созвон|наберите|перезвоните|call me"
    r"|let'?s (talk|have a call)|talk next|обсудим"
)
# (pattern, in Russian, in English); the first found in the client's latest message wins.
OBJECTIONS: Final[tuple[tuple[Matcher, str, str], ...]] = (
    (
        gated(
            "решили|выбрали|остаемся|останемся|остаться|подписали|договорились|работать|уйдем|"
            "уходим|нашли|уже работаем|decided to go|gone with|go with|going with|went with|"
            "chose|signed with|found|hired|другое предложение|одно предложение|another offer",
            re.compile(rf"{_COMPETITOR}|другое предложение|ещ[её] одно предложение|another offer"),
        ),
        "выбрали другое агентство",
        "chose another agency",
    ),
    (re.compile(r"своего таргетолога|в штат|in-house"), "свой специалист в штате", "in-house team"),
    (PRICE_OBJECTION, "дорого", "too expensive"),
    (re.compile(r"бесплатн|free (test|trial)"), "хочет бесплатный тест", "wants a free trial"),
    (re.compile(r"гарант|guarantee"), "нужны гарантии результата", "wants guarantees"),
    (
        re.compile(r"не (скажу|буду|хочу)|без созвон|зачем вам|won'?t (tell|share)"),
        "не отвечает на вопросы квалификации",
        "refuses qualifying questions",
    ),
    (
        re.compile(r"отменя|передумал|решили (не|пока не)|decided not to"),
        "отменили решение о рекламе",
        "cancelled the plan",
    ),
    (
        gated(
            "подума|вернусь|вернемся|отложим|после|месяце|недел|не сейчас|не готов|январе|феврале|"
            "марте|апреле|мае|июне|июле|августе|сентябре|октябре|ноябре|декабре|next month|think|"
            "not now|not ready",
            re.compile(
                r"подумаю|подумаем|вернусь|вернемся|отложим|после (релиза|ремонта|праздник|запуска"
                r"|отпуска)|в (следующем|другом) месяце|через \d+ недел|не сейчас|пока не готов"
                r"|в (январе|феврале|марте|апреле|мае|июне|июле|августе|сентябре|октябре|ноябре"
                r"|декабре)|next month|think (about it|a bit|it over)|not now|not ready yet"
            ),
        ),
        "отложили решение",
        "postponed the decision",
    ),
)
