"""Offline example data for `qtune demo`: customer-service questions from a banking / shopping app.

The table below holds 40 hand-written FAQ intents (password resets, refunds, deliveries, cards,
fees, app login, ...). Each intent has a canonical question, a short help-desk answer and 7-8
paraphrases a customer might type, typos included. The intents come in confusable pairs
("reset my password" vs "change my email address", "card declined" vs "card stolen", ...) that
share vocabulary but not meaning, so word overlap alone cannot solve the task.

From the table, `make_pairs` builds a question-matching data set (same intent or not) to
fine-tune a small sentence encoder, and `write_demo_files` writes it as `train.csv` / `dev.csv`
together with `faq.csv`, the knowledge base of canonical questions and answers.

Everything here is standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from qtune.io import atomic_path

__all__ = [
    "FaqIntent",
    "INTENTS",
    "CONFUSABLE_PAIRS",
    "sibling_id",
    "make_pairs",
    "write_demo_files",
]

Pair = tuple[str, str, int]


@dataclass(frozen=True)
class FaqIntent:
    id: str
    question: str
    answer: str
    paraphrases: tuple[str, ...]


# Consecutive intents form a confusable pair (see CONFUSABLE_PAIRS below): they reuse each
# other's words on purpose, while paraphrases of one intent often share few words with it.
INTENTS: tuple[FaqIntent, ...] = (
    # --- password vs email -----------------------------------------------------------------
    FaqIntent(
        "reset-password",
        "How do I reset my password?",
        "Tap 'Forgot password' on the sign-in screen and we will email you a reset link. "
        "The link is valid for 30 minutes.",
        (
            "I forgot my password, what do I do",
            "how can i change my password if i can't remember it",
            "Can't remember my login password, how do I set a new one?",
            "password reset pls",
            "I need a new pasword, the old one doesn't work anymore",
            "What are the steps to recover my account password?",
            "Where do I go to make a new password for my account?",
            "locked out because I forgot the password",
        ),
    ),
    FaqIntent(
        "change-email",
        "How do I change the email address on my account?",
        "Go to Settings > Profile > Email, enter the new address and confirm it with the code "
        "we send there.",
        (
            "I want to update my email",
            "how can i change my email if i don't use the old one anymore",
            "My e-mail address has changed, how do I update it in the app?",
            "switch the email linked to my account",
            "can i use a diffrent email for my account",
            "Where do I edit the email you send notifications to?",
            "I need to replace the email on my profile with a new one",
        ),
    ),
    # --- cancel vs return ------------------------------------------------------------------
    FaqIntent(
        "cancel-order",
        "How do I cancel my order?",
        "You can cancel from Orders > Order details as long as the order has not shipped yet. "
        "Once it has shipped, please return it instead.",
        (
            "I ordered something by mistake, can I stop it before it ships?",
            "cancel order",
            "how can i cancel something i just bought",
            "I changed my mind about my purchase, it hasn't been sent yet",
            "Is it possible to cancel an order I placed an hour ago?",
            "plz cancel my order before it gets shipped",
            "I don't want the item anymore and it hasn't shipped, how do I call it off?",
        ),
    ),
    FaqIntent(
        "return-item",
        "How do I return an item I received?",
        "Open Orders, choose the item and tap 'Return'. Print the free label and drop the parcel "
        "off within 30 days of delivery.",
        (
            "I got my order but I don't want it, how do I send it back?",
            "return an item",
            "how can i send back something i bought",
            "I changed my mind about a purchase that was already delivered",
            "What is your return policy for things I already have?",
            "need a return label for my package",
            "The shoes arrived but don't fit, can I ship them back to you?",
        ),
    ),
    # --- declined vs stolen ----------------------------------------------------------------
    FaqIntent(
        "card-declined",
        "Why was my card declined?",
        "Cards are usually declined for insufficient funds, a wrong PIN or expiry date, or a "
        "spending limit. Check the card screen in the app for the exact reason.",
        (
            "my card got rejected at the store",
            "Payment failed with my card, why?",
            "why isn't my card working when I try to pay",
            "The shop said my card was refused even though I have money",
            "card keeps getting denied online",
            "What does it mean when a transaction is declined?",
            "tried to pay for groceries and the card didnt go through",
        ),
    ),
    FaqIntent(
        "card-stolen",
        "My card was stolen, what should I do?",
        "Freeze the card right away in the app under Cards > Freeze, then order a replacement. "
        "We will refund any payments you did not make.",
        (
            "someone took my card",
            "I lost my wallet with my card in it",
            "my card is missing and I think someone is using it",
            "How do I block a stolen card?",
            "card got stolen at the store, please help",
            "I can't find my debit card anywhere, what now?",
            "report a lost or stolen card",
            "my purse was stolen with my bank card",
        ),
    ),
    # --- increase vs check credit limit ----------------------------------------------------
    FaqIntent(
        "increase-credit-limit",
        "How can I increase my credit limit?",
        "Request a higher limit under Cards > Credit limit > Request increase. We will review "
        "your income and payment history and reply within two working days.",
        (
            "I want a higher credit limit",
            "can you raise my limit on the credit card",
            "how do I get more credit on my card",
            "request a limit increase",
            "My limit is too low, is it possible to make it bigger?",
            "Could I apply for a larger spending limit on my credit card?",
            "incrase credit limit",
        ),
    ),
    FaqIntent(
        "check-credit-limit",
        "How can I check my credit limit?",
        "Your credit limit and the amount still available are shown on the card screen, "
        "under Cards > Credit limit.",
        (
            "what is my credit limit",
            "where can I see my limit on the credit card",
            "how much credit do I have left on my card",
            "find out my card limit",
            "How much am I allowed to spend on my credit card?",
            "Is there a way to view how much available credit I have?",
            "chek my credit limit",
        ),
    ),
    # --- track delivery vs change delivery address ----------------------------------------
    FaqIntent(
        "track-delivery",
        "How can I track my delivery?",
        "Open Orders and tap the order to see its tracking number and live status from the "
        "courier.",
        (
            "where is my package right now",
            "track my order",
            "Can I see where my parcel is?",
            "how do i follow my shipment",
            "Is there a tracking number for my order?",
            "when will my delivery get here, I want to see its status",
            "wheres my order at",
        ),
    ),
    FaqIntent(
        "change-delivery-address",
        "Can I change the delivery address for my order?",
        "If the order has not shipped, edit the address in Orders > Order details. After it "
        "ships, use the courier's tracking page to redirect it.",
        (
            "I put the wrong address on my order",
            "ship my order to a different address",
            "Can I send my parcel somewhere else?",
            "how do i update where my package goes",
            "I moved, can my order be delivered to my new place instead?",
            "change shipping adress",
            "typo in the delivery address, can you fix it?",
        ),
    ),
    # --- refund status vs request refund ---------------------------------------------------
    FaqIntent(
        "refund-status",
        "Where is my refund?",
        "Refunds are issued within 2 days of approval and take 3 to 5 working days to reach "
        "your account. You can follow them under Orders > Refunds.",
        (
            "I returned my item weeks ago and still haven't got my money back",
            "when will I get my refund",
            "refund not received yet",
            "How long does it take for the refund to show up on my card?",
            "you said you'd refund me but nothing arrived",
            "check the status of my refund",
            "still waiting on my refnd",
        ),
    ),
    FaqIntent(
        "request-refund",
        "How do I get a refund?",
        "Open the order, tap 'Request refund' and tell us what went wrong. We answer most "
        "requests within one working day.",
        (
            "I want my money back",
            "can I get a refund for my order",
            "how to ask for a refund",
            "What do I need to do to be refunded?",
            "I'd like to be reimbursed for a purchase",
            "start a refund request",
            "am i eligible for a refund on this",
        ),
    ),
    # --- can't log in vs verification code --------------------------------------------------
    FaqIntent(
        "cant-login",
        "Why can't I log in to the app?",
        "Check that the app is up to date and that you are using the right email and password. "
        "After five failed attempts the account is locked for 15 minutes.",
        (
            "the app won't let me sign in",
            "login not working",
            "I can't get into my account on my phone",
            "it keeps saying my details are wrong when I try to log in",
            "Why am I unable to access my account in the app?",
            "cant log in since the last update",
            "signing in fails every time",
        ),
    ),
    FaqIntent(
        "verification-code",
        "Why am I not receiving my verification code?",
        "Codes are sent by SMS to the phone number on your account. Check the number in "
        "Settings and wait a minute before asking for a new code.",
        (
            "the login code never arrives",
            "I'm not getting the SMS to sign in",
            "no text message with the security code",
            "two-factor code not received",
            "Where is the one-time passcode? I've been waiting ages",
            "didnt get the 6 digit code",
            "the app asks for a code but I never got one",
        ),
    ),
    # --- close vs open account --------------------------------------------------------------
    FaqIntent(
        "close-account",
        "How do I close my account?",
        "Move your remaining balance out first, then go to Settings > Account > Close account. "
        "Closing is permanent.",
        (
            "I want to delete my account",
            "how can I shut down my bank account",
            "cancel my membership and remove my account",
            "I don't want to bank with you anymore",
            "close acount please",
            "What's the process for terminating my account?",
            "get rid of my account permanently",
        ),
    ),
    FaqIntent(
        "open-account",
        "How do I open an account?",
        "Download the app, tap 'Sign up' and verify your identity with a photo ID. It takes "
        "about ten minutes.",
        (
            "I want to create an account",
            "how can I set up a bank account with you",
            "sign up for a new account",
            "I'd like to become a customer",
            "open acount",
            "What's the process for registering?",
            "what do I need to join",
        ),
    ),
    # --- monthly fee vs ATM fee -------------------------------------------------------------
    FaqIntent(
        "monthly-fee",
        "Why was I charged a monthly fee?",
        "Premium plans have a monthly fee taken on the first day of each month. You can switch "
        "to the free plan in Settings > Plan.",
        (
            "what is this monthly charge on my account",
            "why do you take money every month",
            "there's a subscription fee I didn't expect",
            "I see a fee at the start of each month, what is it for?",
            "account maintenance fee",
            "why am i paying a montly fee",
            "Do I have to pay for my account every month?",
        ),
    ),
    FaqIntent(
        "atm-fee",
        "Why was I charged a fee for using an ATM?",
        "Withdrawals are free up to 200 per month; after that we charge 2%. Some ATM owners "
        "add their own fee too, shown on the machine screen.",
        (
            "what is this charge after taking out cash",
            "why do you take money when I withdraw",
            "there's a fee for the cash machine I didn't expect",
            "I got charged for getting money out of a cashpoint",
            "atm withdrawal fee",
            "how many free withdrawls do i get",
            "Do I pay anything to use an ATM?",
        ),
    ),
    # --- order new card vs activate card ----------------------------------------------------
    FaqIntent(
        "order-card",
        "How do I order a new card?",
        "Go to Cards > Order new card and confirm your address. The card arrives within 5 to "
        "7 working days.",
        (
            "I need a replacement card",
            "my card expired, how do I get another one",
            "can you send me a new debit card",
            "request a new card",
            "my card is broken, I'd like a fresh one",
            "how do I get a physical card",
            "order anther card",
        ),
    ),
    FaqIntent(
        "activate-card",
        "How do I activate my new card?",
        "Open Cards, tap the new card and choose 'Activate', then enter the last four digits "
        "printed on it.",
        (
            "I got my card in the post, what now",
            "my new card doesn't work yet",
            "how do I start using the card you sent",
            "activate card",
            "The card arrived, how do I turn it on?",
            "how do I set up my physical card",
            "activte my new card",
        ),
    ),
    # --- send money vs transfer not arrived -------------------------------------------------
    FaqIntent(
        "transfer-money",
        "How do I send money to another account?",
        "Tap Payments > Send, choose a contact or enter their account details, then confirm "
        "the amount.",
        (
            "how can I transfer money to a friend",
            "I want to pay someone",
            "send money to another bank",
            "make a transfer",
            "How do I move funds to someone else's account?",
            "pay my rent to my landlord's bank account",
            "how to transfer mony",
        ),
    ),
    FaqIntent(
        "transfer-pending",
        "Why hasn't my transfer arrived yet?",
        "Transfers to other banks can take up to one working day. If it is still pending after "
        "that, check the recipient's details in the payment screen.",
        (
            "my friend hasn't received the money I sent",
            "I paid someone but it's still pending",
            "money sent to another bank not there yet",
            "the transfer is taking forever",
            "How long until the funds show up in the other account?",
            "my landlord says my rent payment didn't arrive",
            "transfer stuck on processing",
        ),
    ),
    # --- charged twice vs unknown charge ----------------------------------------------------
    FaqIntent(
        "duplicate-charge",
        "Why was I charged twice for the same purchase?",
        "A second charge is often a temporary hold that disappears within 3 days. If both "
        "payments are still there after that, dispute one in the app.",
        (
            "I see the same payment two times",
            "you took the money twice",
            "double charge on my card",
            "the shop charged me 2x for one order",
            "Why are there two identical transactions on my statement?",
            "payment went through twice by mistake",
            "i was billed twice",
        ),
    ),
    FaqIntent(
        "unrecognized-charge",
        "There is a charge on my account I don't recognize.",
        "Tap the transaction to see the merchant details. If you still don't recognise it, "
        "freeze your card and dispute the payment from the same screen.",
        (
            "I see a payment I didn't make",
            "you took money for something I never bought",
            "strange charge on my card",
            "who is this merchant on my statement?",
            "Why is there a transaction I don't know about?",
            "payment from a shop I've never been to",
            "unknown transaction on my acount",
        ),
    ),
    # --- change PIN vs forgot PIN -----------------------------------------------------------
    FaqIntent(
        "change-pin",
        "How do I change my card PIN?",
        "Go to Cards > Security > Change PIN. You will need your current PIN to set a new one.",
        (
            "I want a different PIN",
            "update my pin number",
            "can I pick a new PIN for my card",
            "set a new 4 digit code for my debit card",
            "How do I switch my current PIN to something easier?",
            "chnage pin",
            "I'd like to modify the PIN on my card",
        ),
    ),
    FaqIntent(
        "forgot-pin",
        "I forgot my card PIN, how can I see it?",
        "You can view your PIN in the app under Cards > Security > Show PIN after confirming "
        "your identity.",
        (
            "I can't remember my PIN",
            "what is my pin number",
            "where can I find the PIN for my card",
            "forgot the 4 digit code for my debit card",
            "How do I recover my PIN?",
            "forgot pin",
            "my PIN slipped my mind and the ATM won't give me cash",
        ),
    ),
    # --- phone number vs home address -------------------------------------------------------
    FaqIntent(
        "update-phone",
        "How do I update my phone number?",
        "Go to Settings > Profile > Phone number. We will text a code to the new number to "
        "confirm it.",
        (
            "I have a new mobile number",
            "change the phone number on my account",
            "my number changed, how do I let you know?",
            "update my contact number",
            "I got a new phone with a different number",
            "how do i edit my cell number",
            "Where do I change the mobile number you text?",
        ),
    ),
    FaqIntent(
        "update-address",
        "How do I update my home address?",
        "Go to Settings > Profile > Address and upload a recent proof of address, such as a "
        "utility bill.",
        (
            "I moved house",
            "change the address on my account",
            "my address changed, how do I let you know?",
            "update my residential address",
            "I've relocated to a new flat",
            "how do i edit my adress",
            "Where do I change the address you send letters to?",
        ),
    ),
    # --- wrong item vs damaged item ---------------------------------------------------------
    FaqIntent(
        "wrong-item",
        "I received the wrong item, what should I do?",
        "Sorry about that! Report it under Orders > Problem with order and we will send the "
        "right item with a free return label for the wrong one.",
        (
            "you sent me something I didn't order",
            "the package has a different product in it",
            "I ordered a blue shirt and got a red one",
            "wrong product delivered",
            "This isn't what I bought",
            "got someone elses order",
            "the item in the box doesn't match my order",
        ),
    ),
    FaqIntent(
        "damaged-item",
        "My item arrived damaged, what can I do?",
        "Please send us a photo under Orders > Problem with order. We will replace the item or "
        "refund you, and you can keep the damaged one.",
        (
            "the product I ordered came broken",
            "the package was crushed and the thing inside is ruined",
            "I ordered a vase and it arrived cracked",
            "broken item delivered",
            "This is damaged, I want a replacement",
            "got my order and its all smashed",
            "the item in the box has scratches and dents",
        ),
    ),
    # --- package missing vs package late ----------------------------------------------------
    FaqIntent(
        "missing-package",
        "My package says delivered but I didn't get it.",
        "Check with neighbours and your building's reception first. If it is still missing "
        "after 24 hours, report it under Orders and we will investigate with the courier.",
        (
            "tracking says delivered but nothing is here",
            "my parcel was marked as delivered but it never arrived",
            "I think my package got stolen from my doorstep",
            "the courier claims they dropped it off but I have nothing",
            "order shows delivered, where is it?",
            "never recieved my package even though its delivered",
            "the driver left it somewhere but not at my house",
        ),
    ),
    FaqIntent(
        "delivery-delay",
        "Why is my delivery late?",
        "Deliveries can be delayed by the courier during busy periods. The tracking page shows "
        "the latest estimate; if it is more than 5 days late, contact us.",
        (
            "my parcel should have arrived yesterday",
            "the order is taking much longer than it said",
            "estimated delivery date has passed",
            "why is shipping so slow",
            "my package is delayed",
            "it's been two weeks and my order still hasn't come",
            "delivery running late, any update?",
        ),
    ),
    # --- add vs remove payment method -------------------------------------------------------
    FaqIntent(
        "add-payment-method",
        "How do I add a payment method?",
        "Go to Settings > Payment methods > Add and enter your card details or link a bank "
        "account.",
        (
            "I want to add a new card to my account",
            "how can I save another card for payments",
            "link my bank account",
            "add a credit card to pay with",
            "Can I use a different card at checkout?",
            "how to put my paypal on the account",
            "add card",
        ),
    ),
    FaqIntent(
        "remove-payment-method",
        "How do I remove a payment method?",
        "Go to Settings > Payment methods, tap the card or account and choose 'Remove'.",
        (
            "I want to delete a card from my account",
            "how can I get rid of an old card I saved",
            "unlink my bank account",
            "take off the credit card I don't use",
            "Can I stop a card being stored on the account?",
            "how to remove my paypal",
            "delete card",
        ),
    ),
    # --- exchange rate vs foreign transaction fee -------------------------------------------
    FaqIntent(
        "exchange-rate",
        "What exchange rate do you use for foreign currencies?",
        "We use the live interbank rate at the moment of payment, shown in the app before you "
        "confirm an exchange.",
        (
            "how much are euros in dollars with your card",
            "what rate do I get when paying abroad",
            "currency conversion rate",
            "is your exchange rate good compared to the bank",
            "How do you convert my money when I spend in another currency?",
            "exchage rate for pounds",
            "what will I get for 100 dollars in yen",
        ),
    ),
    FaqIntent(
        "foreign-transaction-fee",
        "Is there a fee for paying in a foreign currency?",
        "Card payments abroad are free on weekdays. On weekends we add 0.5% to cover currency "
        "market closures.",
        (
            "do you charge me for using my card abroad",
            "what fees do I pay when paying abroad",
            "currency conversion fee",
            "is it free to spend in euros",
            "Will I be charged extra when I shop in another currency?",
            "foriegn transaction fees",
            "how much does it cost to use the card on holiday",
        ),
    ),
    # --- statement vs transaction history ---------------------------------------------------
    FaqIntent(
        "download-statement",
        "How do I download my bank statement?",
        "Go to Account > Statements, choose the month and tap 'Download PDF'.",
        (
            "I need a statement for my landlord",
            "get a PDF of my account statement",
            "where are my monthly statements",
            "can I export last month's statement",
            "How do I get an official statement for a mortgage application?",
            "download statment",
            "send me a bank statement as a pdf",
        ),
    ),
    FaqIntent(
        "transaction-history",
        "Where can I see my transaction history?",
        "All your payments are listed on the home screen; scroll down or use the search to go "
        "further back.",
        (
            "I want to look at my past payments",
            "show me what I spent last month",
            "where are my recent transactions",
            "can I see all my purchases",
            "How do I find a payment from a few weeks ago?",
            "transaction histroy",
            "list of my payments in the app",
        ),
    ),
    # --- talk to a person vs complain -------------------------------------------------------
    FaqIntent(
        "contact-support",
        "How can I talk to a person?",
        "Tap Help > Chat with us. An agent answers within a few minutes, 24/7.",
        (
            "I want to speak to a human",
            "how do I reach customer service",
            "is there a phone number I can call",
            "connect me to an agent",
            "Can I chat with someone from support?",
            "real person please",
            "how to contact you",
        ),
    ),
    FaqIntent(
        "file-complaint",
        "How do I make a complaint?",
        "Tap Help > Make a complaint and describe what happened. We reply within 15 working "
        "days.",
        (
            "I want to complain about the service",
            "how do I report bad customer service",
            "I'm unhappy with how my issue was handled",
            "file a formal complaint",
            "Can I escalate a problem with your support team?",
            "your agent was rude, who do I tell",
            "how to lodge a complaint with you",
        ),
    ),
)

CONFUSABLE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (INTENTS[i].id, INTENTS[i + 1].id) for i in range(0, len(INTENTS), 2)
)

TRAIN_PAIRS = 400
DEV_PAIRS = 150
POSITIVE_RATIO = 0.4
# Paraphrases per intent kept out of train. Three leaves three positive pairs per intent in dev
# and still at least five sentences (the canonical question plus four) per intent in train.
DEV_PARAPHRASES_PER_INTENT = 3


def sibling_id(intent_id: str) -> str:
    """The id of the intent deliberately written to be confused with `intent_id`."""
    for a, b in CONFUSABLE_PAIRS:
        if intent_id == a:
            return b
        if intent_id == b:
            return a
    raise KeyError(intent_id)


def make_pairs(seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """Build (train, dev) lists of (sentence1, sentence2, label); label 1 = same intent.

    About 40% of each split is positive; negatives are half confusable-sibling pairs, half
    random other intents. Dev uses only paraphrases held out from train, so it measures
    generalisation to unseen wording, not memorisation. The result depends only on `seed`.
    """
    rng = random.Random(seed)
    train_sents, dev_sents = _split_sentences(rng)
    train = _build_split(train_sents, TRAIN_PAIRS, rng)
    dev = _build_split(dev_sents, DEV_PAIRS, rng)
    return train, dev


def _split_sentences(rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per intent: the training sentences and the held-out dev paraphrases."""
    train_sents: dict[str, list[str]] = {}
    dev_sents: dict[str, list[str]] = {}
    for intent in INTENTS:
        paraphrases = list(intent.paraphrases)
        rng.shuffle(paraphrases)
        k = DEV_PARAPHRASES_PER_INTENT
        # The canonical question stays in train: it is also the FAQ entry the model will match.
        train_sents[intent.id] = [intent.question, *paraphrases[k:]]
        dev_sents[intent.id] = paraphrases[:k]
    return train_sents, dev_sents


def faq_passage(intent: FaqIntent) -> str:
    """An FAQ entry as a retrieval passage: its question followed by its answer."""
    return f"{intent.question} {intent.answer}"


def write_demo_retrieval(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Retrieval data from the same split as `make_pairs`: customer paraphrases -> FAQ entries.

    `train.jsonl` pairs each training paraphrase with its FAQ passage; `test/` is a BEIR folder
    whose corpus is the 40 FAQ passages and whose queries are the held-out dev paraphrases.
    """
    from qtune.data.retrieval import write_beir, write_query_groups
    from qtune.records import QueryGroup

    out = Path(out_dir)
    train_sents, dev_sents = _split_sentences(random.Random(seed))
    passages = {intent.id: faq_passage(intent) for intent in INTENTS}
    canonical = {intent.id: intent.question for intent in INTENTS}
    groups = [QueryGroup(text, (passages[i],)) for i in passages for text in train_sents[i] if text != canonical[i]]
    queries = {f"{i}-{n}": text for i in passages for n, text in enumerate(dev_sents[i])}
    qrels = {qid: {qid.rsplit("-", 1)[0]: 1} for qid in queries}
    write_query_groups(out / "train.jsonl", groups)
    write_beir(out / "test", passages, queries, qrels)
    return {"train": out / "train.jsonl", "test": out / "test", "corpus": out / "test" / "corpus.jsonl"}


def _build_split(sents: dict[str, list[str]], size: int, rng: random.Random) -> list[Pair]:
    n_pos = round(size * POSITIVE_RATIO)
    n_confusable = (size - n_pos) // 2
    n_random = size - n_pos - n_confusable
    seen: set[frozenset[str]] = set()

    positives = [list(itertools.combinations(sents[i], 2)) for i in sents]
    confusable = [list(itertools.product(sents[a], sents[b])) for a, b in CONFUSABLE_PAIRS]
    pairs = [(*p, 1) for p in _round_robin(positives, n_pos, seen, rng)]
    pairs += [(*p, 0) for p in _round_robin(confusable, n_confusable, seen, rng)]
    pairs += [(*p, 0) for p in _random_negatives(sents, n_random, seen, rng)]
    rng.shuffle(pairs)
    return pairs


def _round_robin(pools: Sequence[list[tuple[str, str]]], n: int, seen: set[frozenset[str]],
                 rng: random.Random) -> list[tuple[str, str]]:
    """Take `n` unseen pairs, cycling over the pools so every intent is represented evenly."""
    iters = []
    for pool in pools:
        pool = list(pool)
        rng.shuffle(pool)
        iters.append(iter(pool))
    order = list(range(len(iters)))
    rng.shuffle(order)
    taken: list[tuple[str, str]] = []
    while len(taken) < n and order:
        still_open = []
        for i in order:
            pair = _next_unseen(iters[i], seen)
            if pair is None:
                continue
            still_open.append(i)
            taken.append(_orient(pair, rng))
            if len(taken) == n:
                break
        order = still_open
    if len(taken) < n:
        raise ValueError(f"only {len(taken)} distinct pairs available, {n} wanted")
    return taken


def _next_unseen(pairs: Iterator[tuple[str, str]], seen: set[frozenset[str]]):
    for a, b in pairs:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            return a, b
    return None


def _random_negatives(sents: dict[str, list[str]], n: int, seen: set[frozenset[str]],
                      rng: random.Random) -> list[tuple[str, str]]:
    """Pairs from two unrelated intents (never siblings): the easy negatives."""
    ids = list(sents)
    taken: list[tuple[str, str]] = []
    attempts = 0
    while len(taken) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"could not draw {n} distinct random negatives")
        a = ids[len(taken) % len(ids)]  # cycle over intents so each gets its share
        b = rng.choice([i for i in ids if i != a and i != sibling_id(a)])
        pair = _next_unseen(iter([(rng.choice(sents[a]), rng.choice(sents[b]))]), seen)
        if pair is not None:
            taken.append(_orient(pair, rng))
    return taken


def _orient(pair: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    # Random order, so a model cannot learn anything from which side a sentence is on.
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


def write_demo_files(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write train.csv, dev.csv and faq.csv into `out_dir` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, dev = make_pairs(seed)
    paths = {"train": out / "train.csv", "dev": out / "dev.csv", "faq": out / "faq.csv"}
    _write_csv(paths["train"], ("sentence1", "sentence2", "label"), train)
    _write_csv(paths["dev"], ("sentence1", "sentence2", "label"), dev)
    _write_csv(paths["faq"], ("id", "question", "answer"),
               ((i.id, i.question, i.answer) for i in INTENTS))
    return paths


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with atomic_path(path) as tmp:
        # newline="" lets the csv module write its own line endings, as its docs require.
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
