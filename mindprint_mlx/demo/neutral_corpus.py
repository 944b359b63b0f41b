"""A neutral-voice market primer: the demo base model's pretraining corpus.

A few hundred plain question/answer pairs about markets, in a textbook voice with none of
the demo persona's voice markers (no seasons, tides, tree rings or "risk first"). The demo
model is pretrained on it so that, before any persona training, it answers questions in its
domain in real words and a neutral voice; the pipeline's job (teaching the persona's voice)
is then visible in the difference.

The corpus is composed, deterministically, from a list of concepts (each a few short
sentences: a definition, why it matters, how it works, how to use it, a caution) and a
list of question templates, each template choosing which 2 or 3 sentences answer it. Same
code, same corpus: no randomness. None of its questions is a curriculum prompt or quiz
question (a test checks), and none of the held-out prompts (`heldout_prompts.jsonl`)
appears here.
"""

from __future__ import annotations

from functools import lru_cache

# (noun phrase used in questions, "does"/"do" for that phrase, sentences by key)
# d: definition, w: why it matters, e: how it works, p: practice, c: caution.
_CONCEPTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("market cycles", "do", {
        "d": "A market cycle is the repeating pattern of rising and falling prices over several years.",
        "w": "Knowing where prices stand in a cycle helps an investor set sensible expectations.",
        "e": "A cycle usually moves through accumulation, markup, distribution and markdown.",
        "p": "Compare current prices, volume and news with past cycles before you act.",
        "c": "No two cycles have the same length, so turning dates cannot be predicted exactly."}),
    ("accumulation", "does", {
        "d": "Accumulation is the phase when prices are low and informed buyers slowly build positions.",
        "w": "Accumulation often comes before a long rise in prices.",
        "e": "During accumulation prices move sideways on light volume while bad news fades.",
        "p": "Look for prices that stop making new lows even when the news is poor.",
        "c": "Accumulation is easy to confuse with a pause in a falling market."}),
    ("distribution", "does", {
        "d": "Distribution is the phase near a top when early buyers sell to late buyers.",
        "w": "Distribution warns that a rise in prices may be close to its end.",
        "e": "Prices stall on heavy volume, and good news no longer lifts them.",
        "p": "Watch for days of high volume that end with little price progress.",
        "c": "A single flat week is not proof of distribution."}),
    ("bear markets", "do", {
        "d": "A bear market is a broad fall in prices, often defined as a drop of twenty percent or more.",
        "w": "Bear markets test an investor's plan and nerves more than any other period.",
        "e": "Prices fall in steps, with sharp rallies that fail along the way.",
        "p": "Keep position sizes small and hold some cash during a bear market.",
        "c": "Buying every dip in a bear market can lead to repeated losses."}),
    ("bull markets", "do", {
        "d": "A bull market is a long period of rising prices across most of a market.",
        "w": "Most long term gains are earned during bull markets.",
        "e": "Prices make higher highs and higher lows as more buyers join.",
        "p": "Stay invested with a clear exit plan while the rise continues.",
        "c": "Late in a bull market, investors often take more risk than they realize."}),
    ("trends", "do", {
        "d": "A trend is the general direction of prices over a period of time.",
        "w": "Trading with the trend tends to work better than fighting it.",
        "e": "An uptrend shows higher highs and higher lows, and a downtrend shows the reverse.",
        "p": "Mark the recent highs and lows on a chart to see the direction.",
        "c": "Short moves against the trend are normal and do not always end it."}),
    ("momentum", "does", {
        "d": "Momentum is the speed and strength of a price move.",
        "w": "Strong momentum often continues for a while before it fades.",
        "e": "It compares recent returns with older returns to measure how fast prices change.",
        "p": "Use momentum to confirm a trend rather than to predict a turn.",
        "c": "Momentum can reverse quickly when a crowded trade unwinds."}),
    ("moving averages", "do", {
        "d": "A moving average is the average price over a fixed number of recent days.",
        "w": "It smooths out daily noise so the main direction is easier to see.",
        "e": "Each day the oldest price drops out and the newest price is added.",
        "p": "Compare the price with its moving average to judge the trend.",
        "c": "A moving average lags behind price, so its signals come late."}),
    ("trading volume", "does", {
        "d": "Volume is the number of shares or contracts traded in a period.",
        "w": "Volume shows how much conviction stands behind a price move.",
        "e": "Rising prices on rising volume suggest strong demand from buyers.",
        "p": "Check whether volume confirms a breakout before you trust it.",
        "c": "Volume alone does not tell you the direction of the next move."}),
    ("support and resistance", "do", {
        "d": "Support is a level where falling prices have stopped before, and resistance is a level where rising prices have stalled.",
        "w": "These levels help an investor plan entries, exits and stops.",
        "e": "Many traders remember past prices, so orders gather near those levels.",
        "p": "Mark the levels where price turned several times on a chart.",
        "c": "Levels are zones, not exact lines, and they do break."}),
    ("breakouts", "do", {
        "d": "A breakout is a move of price beyond a clear support or resistance level.",
        "w": "Breakouts can mark the start of a new trend.",
        "e": "When price clears a level on strong volume, new buyers or sellers often follow.",
        "p": "Wait for a close beyond the level before acting on a breakout.",
        "c": "Many breakouts fail and fall back into the old range."}),
    ("investment risk", "does", {
        "d": "Risk is the chance that an investment loses money or falls short of what you need.",
        "w": "Managing risk keeps small mistakes from becoming large ones.",
        "e": "Risk comes from price swings, debt, a lack of cash and too much money in one idea.",
        "p": "Decide how much you can afford to lose before you buy.",
        "c": "Investors often judge risk by recent gains and forget how far prices can fall."}),
    ("volatility", "does", {
        "d": "Volatility measures how widely and quickly prices move up and down.",
        "w": "Higher volatility means that larger gains and larger losses are both possible.",
        "e": "It is often measured as the standard deviation of daily returns.",
        "p": "Use smaller positions in assets with high volatility.",
        "c": "Calm periods of low volatility can end suddenly."}),
    ("diversification", "does", {
        "d": "Diversification means spreading money across different assets so that no single loss is too large.",
        "w": "It reduces the damage any one holding can do to a portfolio.",
        "e": "Assets that do not move together offset part of each other's swings.",
        "p": "Hold several unrelated assets, sectors and regions instead of one.",
        "c": "In a crisis many assets fall together, so diversification does not remove all risk."}),
    ("position sizing", "does", {
        "d": "Position sizing is deciding how much money to put into a single trade.",
        "w": "Good sizing lets an investor survive a long run of losses.",
        "e": "Size is set by the amount you are willing to lose and the distance to your stop.",
        "p": "Risk a small fixed share of the account, such as one percent, on each idea.",
        "c": "Making a position larger because you feel sure is a common error."}),
    ("stop-loss orders", "do", {
        "d": "A stop-loss order sells a position when price reaches a level set in advance.",
        "w": "It limits the loss on a trade that goes wrong.",
        "e": "Once price touches the stop level, the order becomes a market order to sell.",
        "p": "Place the stop where your reason for the trade would be proven wrong.",
        "c": "Moving a stop further away to avoid a loss defeats its purpose."}),
    ("trailing stops", "do", {
        "d": "A trailing stop is a stop level that follows price as a trade moves in your favor.",
        "w": "It protects part of a gain while letting a winning trade keep running.",
        "e": "The stop rises with price but never moves back down.",
        "p": "Set the trailing distance wider for volatile assets.",
        "c": "A trailing stop that is too tight can close a good trade early."}),
    ("leverage", "does", {
        "d": "Leverage means using borrowed money to hold a larger position than your cash allows.",
        "w": "It makes gains and losses larger by the same factor.",
        "e": "A small fall in price can wipe out a large part of a leveraged account.",
        "p": "Keep leverage low and know exactly how much you could lose.",
        "c": "Margin calls can force you to sell at the worst possible time."}),
    ("drawdowns", "do", {
        "d": "A drawdown is the fall from a peak in account value to a later low.",
        "w": "Drawdowns show how much pain a strategy can cause before it recovers.",
        "e": "A loss of fifty percent needs a gain of one hundred percent to get back to even.",
        "p": "Limit drawdowns with small positions, stops and a mix of assets.",
        "c": "Investors often quit a sound plan in the middle of a drawdown."}),
    ("market sentiment", "does", {
        "d": "Sentiment is the overall mood of investors toward a market.",
        "w": "Extreme moods often appear near important turning points.",
        "e": "Surveys, fund flows and headlines all give clues about sentiment.",
        "p": "Treat very strong optimism or pessimism as a warning, not as a signal on its own.",
        "c": "Sentiment can stay extreme for a long time before prices turn."}),
    ("contrarian investing", "does", {
        "d": "Contrarian investing means acting against the crowd when its views become extreme.",
        "w": "Crowds tend to buy too much near tops and sell too much near bottoms.",
        "e": "A contrarian looks for assets that most investors have given up on.",
        "p": "Combine a contrarian view with evidence from price and value.",
        "c": "Being contrarian all the time is just as risky as following the crowd."}),
    ("fear and greed", "do", {
        "d": "Fear and greed are the two emotions behind most investor mistakes.",
        "w": "They push people to buy high and sell low.",
        "e": "Greed grows as prices rise, and fear grows as prices fall.",
        "p": "Write down your plan in advance so that emotions have less room to act.",
        "c": "Nobody is immune to these emotions, including experienced investors."}),
    ("capitulation", "does", {
        "d": "Capitulation is a wave of panic selling when investors give up on a market.",
        "w": "It often marks the final stage of a large decline.",
        "e": "Prices drop sharply on very heavy volume as the last holders sell.",
        "p": "Wait for prices to settle after a panic before you buy.",
        "c": "A single sharp drop is not always the final low."}),
    ("market bubbles", "do", {
        "d": "A bubble is a period when prices rise far above any reasonable value.",
        "w": "Bubbles cause large losses for those who buy near the top.",
        "e": "Easy credit, exciting stories and the fear of missing out push prices ever higher.",
        "p": "Be careful when rising prices are the main reason people give for buying.",
        "c": "Bubbles can last much longer than critics expect, so betting against them is dangerous."}),
    ("interest rates", "do", {
        "d": "Interest rates are the price of borrowing money.",
        "w": "They affect company profits, asset values and the cost of debt.",
        "e": "Higher rates make borrowing expensive and tend to slow the economy.",
        "p": "Follow central bank decisions and bond yields to see where rates are heading.",
        "c": "Markets often react to rate changes before they actually happen."}),
    ("inflation", "does", {
        "d": "Inflation is the general rise in prices over time.",
        "w": "It reduces the buying power of cash and of fixed income.",
        "e": "When inflation rises, central banks often raise interest rates.",
        "p": "Compare your returns with inflation to see your real gain.",
        "c": "Holding only cash can lose value quietly during inflation."}),
    ("credit", "does", {
        "d": "Credit is borrowed money that households, companies and governments use.",
        "w": "The supply of credit has a strong effect on booms and busts.",
        "e": "When lending is easy, spending and asset prices rise, and when it tightens they fall.",
        "p": "Watch lending standards and credit spreads for early warnings.",
        "c": "Debt that feels safe in good times can become a burden in a downturn."}),
    ("business cycles", "do", {
        "d": "A business cycle is the rise and fall of economic activity over several years.",
        "w": "Company profits and jobs follow it, and markets react to them.",
        "e": "It moves from expansion to a peak, then to contraction and recovery.",
        "p": "Use economic data to see which stage the economy is likely in.",
        "c": "Markets usually turn before the economy does, so the data can come too late."}),
    ("recessions", "do", {
        "d": "A recession is a broad decline in economic activity that lasts for months.",
        "w": "Recessions reduce profits and often bring falling stock prices.",
        "e": "Spending, hiring and production all fall during a recession.",
        "p": "Keep an emergency fund and avoid heavy debt before a downturn.",
        "c": "Stock markets often start to recover while the recession is still going on."}),
    ("commodity prices", "do", {
        "d": "Commodity prices are the prices of raw goods such as oil, metals and grain.",
        "w": "They affect inflation, company costs and whole economies.",
        "e": "High prices encourage new supply, which later pushes prices down again.",
        "p": "Look at supply, demand and stock levels to understand price moves.",
        "c": "Commodity prices can swing sharply on weather or political news."}),
    ("a trading journal", "does", {
        "d": "A trading journal is a written record of every trade and the reason for it.",
        "w": "It turns experience into lessons you can review.",
        "e": "Each entry notes the setup, entry, exit, size, result and your emotions.",
        "p": "Write the entry before the trade and the review after it closes.",
        "c": "A journal is useless if you never read it again."}),
    ("trade reviews", "do", {
        "d": "A trade review is a regular look back at your recent decisions.",
        "w": "It shows which habits help you and which ones hurt you.",
        "e": "You compare what you planned with what you actually did.",
        "p": "Set a fixed time each week to review your trades.",
        "c": "Judging a trade only by its profit can teach the wrong lesson."}),
    ("entry points", "do", {
        "d": "An entry point is the price and moment at which you open a position.",
        "w": "A careful entry improves the balance of risk and reward.",
        "e": "Many investors enter near support or after a confirmed breakout.",
        "p": "Decide your entry, stop and target before you place the order.",
        "c": "Chasing a price that has already run far is a common mistake."}),
    ("taking profits", "does", {
        "d": "Taking profits means selling part or all of a winning position.",
        "w": "A gain is not real until the position is closed.",
        "e": "Some investors sell in steps as price reaches planned targets.",
        "p": "Plan your exit rules before you enter the trade.",
        "c": "Selling winners too early while holding losers is a common pattern."}),
    ("scaling into a position", "does", {
        "d": "Scaling in means building a position in several smaller purchases.",
        "w": "It reduces the damage of a poorly timed entry.",
        "e": "You buy part of the position first and add more if the idea works.",
        "p": "Set the size of each step in advance.",
        "c": "Adding to a losing trade without a plan can make losses larger."}),
    ("asset allocation", "does", {
        "d": "Asset allocation is the split of a portfolio between stocks, bonds, cash and other assets.",
        "w": "It explains most of the ups and downs of a portfolio.",
        "e": "Each asset class reacts differently to growth, inflation and rates.",
        "p": "Choose a mix that fits your goals and your tolerance for losses.",
        "c": "Changing the mix after every headline usually hurts returns."}),
    ("rebalancing", "does", {
        "d": "Rebalancing means bringing a portfolio back to its target mix.",
        "w": "It stops one asset from growing into too large a share.",
        "e": "You sell some of what has risen and buy some of what has fallen.",
        "p": "Rebalance on a fixed schedule or when the weights drift too far.",
        "c": "Skipping rebalancing lets risk grow without anyone noticing."}),
    ("bonds", "do", {
        "d": "A bond is a loan to a government or company that pays interest.",
        "w": "Bonds can steady a portfolio when stocks fall.",
        "e": "Bond prices fall when interest rates rise, and rise when rates fall.",
        "p": "Match the length of your bonds to when you will need the money.",
        "c": "Bonds from weak borrowers carry a real risk of default."}),
    ("valuation", "does", {
        "d": "Valuation is an estimate of what an asset is worth compared with its price.",
        "w": "Buying at a high valuation leaves less room for future gains.",
        "e": "Ratios such as price to earnings compare the price with profits.",
        "p": "Compare a valuation with its own history and with similar assets.",
        "c": "Cheap assets can stay cheap for years."}),
    ("liquidity", "does", {
        "d": "Liquidity is how easily an asset can be bought or sold without moving its price.",
        "w": "Poor liquidity can make it hard to exit when you need to.",
        "e": "Liquid assets trade often, with many buyers and sellers.",
        "p": "Check the daily volume and the bid and ask spread before you trade.",
        "c": "Liquidity can disappear quickly in a panic."}),
    ("risk to reward ratios", "do", {
        "d": "A risk to reward ratio compares the possible loss of a trade with its possible gain.",
        "w": "It helps you take only trades where the gain justifies the risk.",
        "e": "A trade that risks one dollar to make three has a ratio of one to three.",
        "p": "Measure the distance to your stop and to your target before each trade.",
        "c": "A good ratio means little if the target is unrealistic."}),
    ("trading discipline", "does", {
        "d": "Discipline means following your rules even when emotions push the other way.",
        "w": "Consistent rules make results easier to measure and improve.",
        "e": "A disciplined investor sizes, enters and exits the same way each time.",
        "p": "Keep your rules short and written where you can see them.",
        "c": "Breaking a rule once often makes it easier to break again."}),
    ("news headlines", "do", {
        "d": "News headlines are short reports that often move prices for a day or two.",
        "w": "Headlines shape the mood of investors.",
        "e": "Dramatic headlines tend to appear after large moves have already happened.",
        "p": "Ask whether the news changes the lasting value of an asset.",
        "c": "Reacting to every headline leads to too much trading."}),
    ("economic indicators", "do", {
        "d": "Economic indicators are data such as jobs, output and prices that describe the economy.",
        "w": "They help investors judge the stage of the business cycle.",
        "e": "Leading indicators tend to change before the economy, and lagging ones change after it.",
        "p": "Watch the direction of several indicators rather than a single report.",
        "c": "Data is often revised, so first readings can mislead."}),
    ("dollar cost averaging", "does", {
        "d": "Dollar cost averaging means investing the same amount at regular intervals.",
        "w": "It removes the pressure of picking the perfect moment.",
        "e": "You buy more shares when prices are low and fewer when they are high.",
        "p": "Set up automatic purchases on a fixed date each month.",
        "c": "It does not protect against a long decline in a poor investment."}),
)

# (question template, sentence keys of the answer). {np}: the concept's noun phrase,
# {does}: its verb agreement ("does"/"do").
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("What does {np} mean?", "de"),
    ("Can you explain {np} in plain words?", "dw"),
    ("Why {does} {np} matter to an investor?", "we"),
    ("How should I think about {np}?", "pc"),
    ("What is a common mistake with {np}?", "cp"),
    ("How {does} {np} work?", "ep"),
    ("What should a beginner know about {np}?", "dcp"),
    ("Could you give me a short summary of {np}?", "dwp"),
    ("What is the most important thing about {np}?", "wc"),
)


@lru_cache(maxsize=1)
def _pairs() -> tuple[tuple[str, str], ...]:
    out = []
    for np_, does, s in _CONCEPTS:
        for q, keys in _TEMPLATES:
            out.append((q.format(np=np_, does=does), " ".join(s[k] for k in keys)))
    return tuple(out)


def neutral_pairs() -> list[tuple[str, str]]:
    """The corpus: (question, answer) pairs, in a fixed order (concept by concept)."""
    return list(_pairs())


def neutral_texts() -> list[str]:
    """Every question and answer of the corpus (for the tokenizer and the lexicon)."""
    return [t for pair in _pairs() for t in pair]


__all__ = ["neutral_pairs", "neutral_texts"]
